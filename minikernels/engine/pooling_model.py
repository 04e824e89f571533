"""What the one-pass models share (:class:`~.embedding.Embedder`,
:class:`~.classifier.Classifier`): a decoder checkpoint run without a KV cache, one output
row per input.

:class:`PoolingModel` loads the checkpoint and its tokenizer, checks inputs (non-empty,
within the context length, ids in the vocabulary), packs inputs into cache-less varlen
forwards of at most ``max_num_batched_tokens`` tokens, and runs them on one worker thread:
async callers (the server) that arrive while it is busy are packed into its next forwards
together, up to the token budget. A subclass says what one forward returns
(:meth:`PoolingModel._forward`: ids -> [B, D] fp32 on the CPU).
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..models import load_model, load_tokenizer
from ..models.hub import resolve_model


class PoolingInputError(ValueError):
    """An input (``index``) or an option (index None) the model cannot take."""

    def __init__(self, message: str, index: Optional[int] = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class _Job:
    """One async caller's inputs, waiting for the worker; ``finish`` maps its rows of the
    forward's output to the caller's result."""

    ids: list[list[int]]
    finish: Callable[[torch.Tensor], Any]
    future: asyncio.Future


class PoolingModel:
    """Base of the one-pass models (see the module docstring).

    model: a HF checkpoint directory, a hub id or a built-in name (random weights).
    max_model_len: the longest input in tokens (default the model's
    max_position_embeddings); longer ones are refused, never truncated silently.
    lm_head: load the checkpoint's lm_head (a classifier reading token logits needs it).
    """

    task = "pool"

    def __init__(self, model: str, *, dtype: str = "bfloat16", device: Optional[str] = None,
                 tokenizer: Optional[str] = "auto", revision: Optional[str] = None,
                 quantization: Optional[str] = None, max_model_len: Optional[int] = None,
                 max_num_batched_tokens: int = 8192, seed: int = 0,
                 lm_head: bool = False) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got "
                             f"{max_num_batched_tokens}")
        self.path = resolve_model(model, revision)
        self.model = load_model(self.path, dtype=dtype, device=device,
                                quantization=quantization, seed=seed, lm_head=lm_head)
        self.model.eval()
        self.model_name = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) \
            else model
        self.tokenizer = load_tokenizer(self.path) if tokenizer == "auto" else \
            (load_tokenizer(tokenizer) if tokenizer else None)
        limit = int(self.model.config.max_position_embeddings)
        self.max_model_len = min(int(max_model_len), limit) if max_model_len else limit
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.hidden_size = int(self.model.config.hidden_size)
        self.vocab_size = int(self.model.config.vocab_size)
        self.num_forwards = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.task)
        self._pending: deque[_Job] = deque()
        self._dispatcher: Optional[asyncio.Task] = None
        self._lock = threading.Lock()
        self._inputs = 0
        self._tokens = 0

    # ------------------------------------------------------------------ api
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids")
        return [int(t) for t in self.tokenizer.encode(text)]

    def check(self, ids: Sequence[Sequence[int]]) -> None:
        """:class:`PoolingInputError` (a ValueError) naming the input that cannot run."""
        if not ids:
            raise PoolingInputError("no inputs", 0)
        for i, x in enumerate(ids):
            if not x:
                raise PoolingInputError(f"input {i} is empty", i)
            if len(x) > self.max_model_len:
                raise PoolingInputError(f"input {i} is {len(x)} tokens; this model's "
                                        f"maximum context length is {self.max_model_len}", i)
            bad = next((t for t in x if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise PoolingInputError(f"input {i} holds token id {bad}, outside the "
                                        f"vocabulary [0, {self.vocab_size})", i)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"prompt_tokens_total": self._tokens, "num_running": 0,
                    "num_waiting": 0, "inputs_total": self._inputs}

    def close(self) -> None:
        """Stop the worker thread (queued calls are cancelled)."""
        self._worker.shutdown(wait=True, cancel_futures=True)

    async def shutdown(self) -> None:
        """:meth:`close`, awaitable like ``AsyncLLM.shutdown`` (the server awaits it)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # ------------------------------------------------------------------ running
    def _run(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The forward's rows [B, D] fp32 (CPU) for checked token-id lists, in batches of
        at most ``max_num_batched_tokens`` tokens (one input may exceed it alone)."""
        parts = [self._forward(ids[start:stop])
                 for start, stop in self._batches([len(x) for x in ids])]
        with self._lock:
            self._inputs += len(ids)
            self._tokens += sum(len(x) for x in ids)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    async def _run_async(self, ids: Sequence[Sequence[int]],
                         finish: Callable[[torch.Tensor], Any] = lambda rows: rows) -> Any:
        """``finish(rows)`` of :meth:`_run` for concurrent async callers (checked ids):
        callers that wait while the worker is busy share its next forwards."""
        loop = asyncio.get_running_loop()
        job = _Job([list(x) for x in ids], finish, loop.create_future())
        self._pending.append(job)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch())
        return await job.future

    async def _dispatch(self) -> None:
        """Drain the pending jobs: each round takes the jobs that fit the token budget
        (at least one) and runs them in one call on the worker thread."""
        loop = asyncio.get_running_loop()
        while self._pending:
            jobs, tokens = [], 0
            while self._pending:
                n = sum(len(x) for x in self._pending[0].ids)
                if jobs and tokens + n > self.max_num_batched_tokens:
                    break
                jobs.append(self._pending.popleft())
                tokens += n
            jobs = [j for j in jobs if not j.future.done()]   # (cancelled callers)
            if not jobs:
                continue
            try:
                rows = await loop.run_in_executor(self._worker, self._run,
                                                  [x for j in jobs for x in j.ids])
            except BaseException as exc:  # noqa: BLE001 - each caller gets the error
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            start = 0
            for j in jobs:
                mine = rows[start:start + len(j.ids)]
                start += len(j.ids)
                if not j.future.done():
                    j.future.set_result(j.finish(mine))

    def _batches(self, lengths: list[int]) -> list[tuple[int, int]]:
        out, start, tokens = [], 0, 0
        for i, n in enumerate(lengths):
            if i > start and tokens + n > self.max_num_batched_tokens:
                out.append((start, i))
                start, tokens = i, 0
            tokens += n
        out.append((start, len(lengths)))
        return out

    def _forward(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """One varlen forward of checked inputs -> [B, D] fp32 on the CPU."""
        raise NotImplementedError
