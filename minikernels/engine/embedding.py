"""Embeddings from a decoder checkpoint: :class:`Embedder` (``LLM``'s counterpart for
embedding models such as Qwen3-Embedding; ``minikernels serve --task embed`` serves it as
OpenAI's ``/v1/embeddings``).

Each call tokenizes its inputs, packs them into cache-less varlen forwards of at most
``max_num_batched_tokens`` tokens (no KV cache is allocated: an embedding needs one pass
over its input), takes the final-normed hidden states and pools them
(:mod:`minikernels.models.pooling`: the checkpoint's sentence-transformers pooling, else
the last token, L2-normalized). ``dimensions`` keeps the first N components and
normalizes again (Matryoshka embeddings, as vLLM and OpenAI's ``dimensions``). Loading,
input checks, batching and the worker thread are :class:`~.pooling_model.PoolingModel`'s.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from ..models import AttentionMetadata
from ..models.pooling import PoolingConfig, pool
from .pooling_model import PoolingInputError, PoolingModel

EmbedInput = Union[str, Sequence[int]]

#: An input (``index``) or ``dimensions`` (index None) that cannot be embedded.
EmbeddingInputError = PoolingInputError


class Embedder(PoolingModel):
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
        super().__init__(model, dtype=dtype, device=device, tokenizer=tokenizer,
                         revision=revision, quantization=quantization,
                         max_model_len=max_model_len,
                         max_num_batched_tokens=max_num_batched_tokens, seed=seed)
        base = PoolingConfig.from_checkpoint(self.path if os.path.isdir(self.path) else None)
        self.pooling = PoolingConfig(pooling or base.mode,
                                     base.normalize if normalize is None else bool(normalize))

    # ------------------------------------------------------------------ api
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
        return self._truncate(self._run(ids), dimensions)

    async def embed_async(self, ids: Sequence[Sequence[int]],
                          dimensions: Optional[int] = None) -> torch.Tensor:
        """:meth:`embed_ids` for concurrent async callers: requests that wait while the
        worker is busy are packed together into its next forwards (up to
        ``max_num_batched_tokens`` tokens), so many small requests cost few forwards."""
        self.check(ids, dimensions)
        return await self._run_async(ids, lambda rows: self._truncate(rows, dimensions))

    def check(self, ids: Sequence[Sequence[int]], dimensions: Optional[int] = None) -> None:
        """:class:`EmbeddingInputError` (a ValueError) naming what cannot be embedded."""
        if not ids:
            raise EmbeddingInputError("no inputs to embed", 0)
        if dimensions is not None and not 1 <= dimensions <= self.hidden_size:
            raise EmbeddingInputError(f"dimensions must be in [1, {self.hidden_size}] (the "
                                      f"model's hidden size), got {dimensions}")
        super().check(ids)

    def stats(self) -> dict:
        out = super().stats()
        out["embeddings_total"] = out.pop("inputs_total")
        return out

    # ------------------------------------------------------------------ internals
    def _truncate(self, v: torch.Tensor, dimensions: Optional[int]) -> torch.Tensor:
        if dimensions is None or dimensions >= v.shape[1]:
            return v
        v = v[:, :dimensions]
        return torch.nn.functional.normalize(v, dim=-1) if self.pooling.normalize else v

    @torch.inference_mode()
    def _forward(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        lengths = [len(x) for x in ids]
        dev = self.model.device
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.int64, device=dev)
        meta = AttentionMetadata.for_prompts(lengths, device=dev,
                                             last_only=self.pooling.last_only)
        h = self.model.hidden_states(flat, meta, None)
        self.num_forwards += 1
        return pool(h, lengths, self.pooling).cpu()
