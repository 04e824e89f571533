"""Embeddings from a decoder checkpoint: :class:`Embedder` (``LLM``'s counterpart for
embedding models such as Qwen3-Embedding; ``minikernels serve --task embed`` serves it as
OpenAI's ``/v1/embeddings``).

Each call tokenizes its inputs, packs them into cache-less varlen forwards of at most
``max_num_batched_tokens`` tokens (no KV cache is allocated: an embedding needs one pass
over its input), takes the final-normed hidden states and pools them
(:mod:`minikernels.models.pooling`: the checkpoint's sentence-transformers pooling, else
the last token, L2-normalized). ``dimensions`` keeps the first N components and
normalizes again (Matryoshka embeddings, as vLLM and OpenAI's ``dimensions``). The forwards
run on one worker thread; async callers (the server) that arrive while it is busy are
packed into its next forwards together, up to the token budget.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from ..models import AttentionMetadata, load_model, load_tokenizer
from ..models.hub import resolve_model
from ..models.pooling import PoolingConfig, pool

EmbedInput = Union[str, Sequence[int]]


@dataclass
class _Job:
    """One async caller's inputs, waiting for the worker."""

    ids: list[list[int]]
    dimensions: Optional[int]
    future: asyncio.Future


class EmbeddingInputError(ValueError):
    """An input (``index``) or ``dimensions`` (index None) that cannot be embedded."""

    def __init__(self, message: str, index: Optional[int] = None) -> None:
        super().__init__(message)
        self.index = index


class Embedder:
    """An embedding model: ``embed(inputs) -> [B, H]`` fp32 (see the module docstring).

    model: a HF checkpoint directory, a hub id or a built-in name (random weights).
    pooling / normalize: override the checkpoint's pooling mode ("last", "mean", "cls")
    and normalization. max_model_len: the longest input in tokens (default the model's
    max_position_embeddings); longer ones are refused, never truncated silently.
    """

    task = "embed"

    def __init__(self, model: str, *, dtype: str = "bfloat16", device: Optional[str] = None,
                 tokenizer: Optional[str] = "auto", revision: Optional[str] = None,
                 quantization: Optional[str] = None, max_model_len: Optional[int] = None,
                 max_num_batched_tokens: int = 8192, pooling: Optional[str] = None,
                 normalize: Optional[bool] = None, seed: int = 0) -> None:
        path = resolve_model(model, revision)
        self.model = load_model(path, dtype=dtype, device=device, quantization=quantization,
                                seed=seed, lm_head=False)
        self.model.eval()
        self.model_name = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) \
            else model
        self.tokenizer = load_tokenizer(path) if tokenizer == "auto" else \
            (load_tokenizer(tokenizer) if tokenizer else None)
        base = PoolingConfig.from_checkpoint(path if os.path.isdir(path) else None)
        self.pooling = PoolingConfig(pooling or base.mode,
                                     base.normalize if normalize is None else bool(normalize))
        limit = int(self.model.config.max_position_embeddings)
        self.max_model_len = min(int(max_model_len), limit) if max_model_len else limit
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got "
                             f"{max_num_batched_tokens}")
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.hidden_size = int(self.model.config.hidden_size)
        self.vocab_size = int(self.model.config.vocab_size)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        self._pending: deque[_Job] = deque()
        self._dispatcher: Optional[asyncio.Task] = None
        self.num_forwards = 0
        self._lock = threading.Lock()
        self._inputs = 0
        self._tokens = 0

    # ------------------------------------------------------------------ api
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids")
        return [int(t) for t in self.tokenizer.encode(text)]

    def embed(self, inputs: Union[EmbedInput, Sequence[EmbedInput]],
              dimensions: Optional[int] = None) -> torch.Tensor:
        """Embeddings [B, D] fp32 on the CPU of texts or token-id lists (one input, or a
        list of them); D = ``dimensions`` or the hidden size."""
        items = [inputs] if isinstance(inputs, str) or (
            isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], int)) \
            else list(inputs)
        ids = [self.tokenize(x) if isinstance(x, str) else [int(t) for t in x] for x in items]
        return self.embed_ids(ids, dimensions)

    def embed_ids(self, ids: Sequence[Sequence[int]],
                  dimensions: Optional[int] = None) -> torch.Tensor:
        """Embeddings [B, D] fp32 (CPU) of token-id lists, checked first."""
        self.check(ids, dimensions)
        out = torch.empty(len(ids), dimensions or self.hidden_size)
        for start, stop in self._batches([len(x) for x in ids]):
            out[start:stop] = self._forward(ids[start:stop], dimensions)
        with self._lock:
            self._inputs += len(ids)
            self._tokens += sum(len(x) for x in ids)
        return out

    async def embed_async(self, ids: Sequence[Sequence[int]],
                          dimensions: Optional[int] = None) -> torch.Tensor:
        """:meth:`embed_ids` for concurrent async callers: requests that wait while the
        worker is busy are packed together into its next forwards (up to
        ``max_num_batched_tokens`` tokens), so many small requests cost few forwards."""
        self.check(ids, dimensions)
        loop = asyncio.get_running_loop()
        job = _Job([list(x) for x in ids], dimensions, loop.create_future())
        self._pending.append(job)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch())
        return await job.future

    async def _dispatch(self) -> None:
        """Drain the pending jobs: each round takes the jobs that fit the token budget
        (at least one) and embeds them in one call on the worker thread."""
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
                vectors = await loop.run_in_executor(
                    self._worker, self.embed_ids, [x for j in jobs for x in j.ids])
            except BaseException as exc:  # noqa: BLE001 - each caller gets the error
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            start = 0
            for j in jobs:
                v = vectors[start:start + len(j.ids)]
                start += len(j.ids)
                if not j.future.done():
                    j.future.set_result(self._truncate(v, j.dimensions))

    def _truncate(self, v: torch.Tensor, dimensions: Optional[int]) -> torch.Tensor:
        if dimensions is None or dimensions >= v.shape[1]:
            return v
        v = v[:, :dimensions]
        return torch.nn.functional.normalize(v, dim=-1) if self.pooling.normalize else v

    def check(self, ids: Sequence[Sequence[int]], dimensions: Optional[int] = None) -> None:
        """:class:`EmbeddingInputError` (a ValueError) naming what cannot be embedded."""
        if not ids:
            raise EmbeddingInputError("no inputs to embed", 0)
        if dimensions is not None and not 1 <= dimensions <= self.hidden_size:
            raise EmbeddingInputError(f"dimensions must be in [1, {self.hidden_size}] (the "
                                      f"model's hidden size), got {dimensions}")
        for i, x in enumerate(ids):
            if not x:
                raise EmbeddingInputError(f"input {i} is empty", i)
            if len(x) > self.max_model_len:
                raise EmbeddingInputError(f"input {i} is {len(x)} tokens; this model's "
                                          f"maximum context length is {self.max_model_len}",
                                          i)
            bad = next((t for t in x if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise EmbeddingInputError(f"input {i} holds token id {bad}, outside the "
                                          f"vocabulary [0, {self.vocab_size})", i)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"prompt_tokens_total": self._tokens, "num_running": 0,
                    "num_waiting": 0, "embeddings_total": self._inputs}

    def close(self) -> None:
        """Stop the worker thread (queued calls are cancelled)."""
        self._worker.shutdown(wait=True, cancel_futures=True)

    async def shutdown(self) -> None:
        """:meth:`close`, awaitable like ``AsyncLLM.shutdown`` (the server awaits it)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # ------------------------------------------------------------------ internals
    def _batches(self, lengths: list[int]) -> list[tuple[int, int]]:
        out, start, tokens = [], 0, 0
        for i, n in enumerate(lengths):
            if i > start and tokens + n > self.max_num_batched_tokens:
                out.append((start, i))
                start, tokens = i, 0
            tokens += n
        out.append((start, len(lengths)))
        return out

    @torch.inference_mode()
    def _forward(self, ids: Sequence[Sequence[int]], dimensions: Optional[int]) -> torch.Tensor:
        lengths = [len(x) for x in ids]
        dev = self.model.device
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.int64, device=dev)
        meta = AttentionMetadata.for_prompts(lengths, device=dev,
                                             last_only=self.pooling.last_only)
        h = self.model.hidden_states(flat, meta, None)
        self.num_forwards += 1
        return self._truncate(pool(h, lengths, self.pooling), dimensions).cpu()
