"""Data parallel: M engine replicas behind one OpenAI server (``--data-parallel-size M``).

Each replica is an :class:`~minikernels.engine.AsyncLLM` with its own engine thread, KV
pool and device (replica i on cuda:i when the device is CUDA; all on the CPU otherwise).
:class:`DataParallelEngine` has AsyncLLM's surface (generate, abort, stats, shutdown,
tokenizer, model_name, max_model_len), so the app serves it unchanged.

Routing, per request:
  1. prefix affinity: the replica that most recently took a prompt sharing at least
     ``min_prefix_blocks`` whole KV blocks with this one (chained block hashes, as the
     engine's prefix cache keys them) gets it, so its cached prefix is reused;
  2. otherwise the replica with the fewest outstanding tokens (prompt + max_tokens of
     its unfinished requests routed here).
The affinity record is the router's own (bounded, LRU), not a view into the replicas'
caches: a block evicted there is simply recomputed.

Data parallel x tensor parallel (``--data-parallel-size M --tensor-parallel-size N``):
one launch (``minikernels.distributed.launch_tensor_parallel_groups``) spawns the workers
of all M tensor-parallel groups in one process group of 1 + M*(N-1) ranks; this process
is rank 0 of every group and runs every replica's engine (replica i's ranks on GPUs
i*N .. i*N+N-1).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

MAX_PREFIX_ENTRIES = 1 << 16


class _Tracked:
    """A replica's request stream that gives its tokens back to the router when done."""

    __slots__ = ("_inner", "_release", "__weakref__")

    def __init__(self, inner: Any, release: Any) -> None:
        self._inner = inner
        self._release = release

    def __aiter__(self) -> "_Tracked":
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._inner.__anext__()
        except BaseException:   # finished (StopAsyncIteration), failed or cancelled
            self._done()
            raise

    def _done(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def aclose(self) -> None:
        self._done()
        await self._inner.aclose()

    def __del__(self) -> None:
        self._done()


class DataParallelEngine:
    """Route requests over ``replicas`` (AsyncLLM-like engines of the same model)."""

    def __init__(self, replicas: list[Any], min_prefix_blocks: int = 4,
                 block_size: int | None = None) -> None:
        if not replicas:
            raise ValueError("DataParallelEngine needs at least one replica")
        self.replicas = list(replicas)
        inner = getattr(self.replicas[0], "engine", None)
        self.block_size = int(block_size or getattr(getattr(inner, "block_manager", None),
                                                    "block_size", 64))
        self.min_prefix_blocks = int(min_prefix_blocks)
        self.honors_output_kind = all(getattr(r, "honors_output_kind", False) is True
                                      for r in self.replicas)
        self.outstanding = [0] * len(self.replicas)       # tokens of unfinished requests
        self.routed = [0] * len(self.replicas)
        self._owner: dict[str, int] = {}                   # request id -> replica
        self._prefix: OrderedDict[int, int] = OrderedDict()  # block-chain hash -> replica

    @classmethod
    def from_args(cls, model: str, data_parallel_size: int, max_queue: int = 1024,
                  **llm_kwargs: Any) -> "DataParallelEngine":
        """Build ``data_parallel_size`` replicas (LLM keyword arguments as AsyncLLM's)."""
        import torch

        from ..engine import LLM, AsyncLLM

        n = int(data_parallel_size)
        if n < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {n}")
        device = llm_kwargs.pop("device", None)
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        tp = int(llm_kwargs.get("tensor_parallel_size", 1))
        if tp > 1 and n > 1:
            return cls([AsyncLLM(llm, max_queue=max_queue, tune_gc=i == 0) for i, llm in
                        enumerate(_tensor_parallel_replicas(model, n, dev, llm_kwargs))])
        if dev.type == "cuda" and torch.cuda.device_count() < n:
            raise ValueError(f"data_parallel_size {n} needs {n} GPUs, "
                             f"{torch.cuda.device_count()} visible")
        replicas = []
        for i in range(n):
            d = torch.device("cuda", i) if dev.type == "cuda" else dev
            # Only replica 0 tunes the (process-wide) GC, so replicas do not fight over it.
            replicas.append(AsyncLLM(LLM(model, device=d, **llm_kwargs), max_queue=max_queue,
                                     tune_gc=i == 0))
        return cls(replicas)

    # ---------------------------------------------------------------- AsyncLLM surface
    @property
    def engine(self) -> Any:
        """Replica 0's LLMEngine (structured-output precompiles warm its cache)."""
        return getattr(self.replicas[0], "engine", None)

    @property
    def tokenizer(self) -> Any:
        return self.replicas[0].tokenizer

    @property
    def model_name(self) -> str:
        return self.replicas[0].model_name

    @property
    def max_model_len(self) -> int:
        return min(r.max_model_len for r in self.replicas)

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The replicas' (one model) recommended sampling fields."""
        return dict(getattr(self.replicas[0], "sampling_defaults", {}))

    @property
    def is_running(self) -> bool:
        return all(getattr(r, "is_running", True) for r in self.replicas)

    @property
    def errored(self) -> bool:
        return any(getattr(r, "errored", False) for r in self.replicas)

    def num_waiting(self) -> int:
        return sum(r.num_waiting() for r in self.replicas)

    def stats(self) -> dict[str, Any]:
        """Sums of the replicas' counters (kv_usage: their mean), plus ``replicas``: each
        replica's own stats with its outstanding tokens and routed-request count."""
        per = []
        for i, r in enumerate(self.replicas):
            s = dict(r.stats())
            s["outstanding_tokens"] = self.outstanding[i]
            s["routed_requests_total"] = self.routed[i]
            per.append(s)
        total: dict[str, Any] = {}
        for s in per:
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        for k in ("kv_usage", "prefix_cache_hit_rate"):
            if k in total:
                total[k] = total[k] / len(per)
        total["data_parallel_size"] = len(per)
        total["replicas"] = per
        return total

    # ---------------------------------------------------------------- routing
    def _block_hashes(self, ids: list[int]) -> list[int]:
        b = self.block_size
        out, h = [], 0
        for i in range(len(ids) // b):
            h = hash((h, tuple(ids[i * b:(i + 1) * b])))
            out.append(h)
        return out

    def route(self, ids: list[int], max_tokens: int) -> int:
        """The replica for a prompt (see the module docstring); records the choice."""
        hashes = self._block_hashes(ids)
        best = None
        for depth in range(len(hashes), self.min_prefix_blocks - 1, -1):
            if depth <= 0:
                break
            owner = self._prefix.get(hashes[depth - 1])
            if owner is not None:
                best = owner
                break
        if best is None:
            best = min(range(len(self.replicas)), key=lambda i: (self.outstanding[i], i))
        for h in hashes:
            self._prefix[h] = best
            self._prefix.move_to_end(h)
        while len(self._prefix) > MAX_PREFIX_ENTRIES:
            self._prefix.popitem(last=False)
        return best

    def generate(self, prompt: str | list[int], params: Any, request_id: str) -> _Tracked:
        if isinstance(prompt, str):
            ids = list(self.replicas[0].engine.tokenize(prompt)[1]) \
                if getattr(self.replicas[0], "engine", None) is not None else []
        else:
            ids = list(prompt)
        i = self.route(ids, int(getattr(params, "max_tokens", 0) or 0))
        cost = len(ids) + int(getattr(params, "max_tokens", 0) or 0) * \
            int(getattr(params, "n", 1) or 1)
        self.outstanding[i] += cost
        self.routed[i] += 1
        self._owner[request_id] = i

        def release() -> None:
            self.outstanding[i] -= cost
            if self._owner.get(request_id) == i:
                del self._owner[request_id]

        return _Tracked(self.replicas[i].generate(prompt, params, request_id), release)

    async def abort(self, request_id: str) -> None:
        i = self._owner.get(request_id)
        if i is not None:
            await self.replicas[i].abort(request_id)

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.shutdown() for r in self.replicas))


def _tensor_parallel_replicas(model: str, n: int, device: Any, llm_kwargs: dict[str, Any]
                              ) -> list[Any]:
    """``n`` LLMs, each over its own tensor-parallel group of one launch."""
    from ..distributed import launch_tensor_parallel_groups
    from ..engine import LLM
    from ..engine.llm_engine import _load_tokenizer

    kw = dict(llm_kwargs)
    tp = int(kw.pop("tensor_parallel_size"))
    load = {k: kw.pop(k) for k in ("dtype", "quantization", "revision") if k in kw}
    load["seed"] = kw.get("seed", 0)
    if kw.get("tokenizer", "auto") == "auto":
        kw["tokenizer"] = _load_tokenizer(model)
    models = launch_tensor_parallel_groups(model, tp, n, device=device, **load)
    try:
        return [LLM(m, **kw) for m in models]
    except BaseException:
        for m in models:
            m.close()
        raise
