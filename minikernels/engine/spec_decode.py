"""Speculative decoding: configuration and draft proposers.

``LLM(..., speculative_config={"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_min": 1, "prompt_lookup_max": 4})``. Each step, a running sequence in
steady decode gets up to k draft tokens from a :class:`Proposer`; the target model scores
its last token plus the drafts in one forward (a prefill-style row with 1 + k query
tokens over its paged prefix), and ``ops.rejection_sample`` keeps the accepted prefix
plus one token from the target (the recovered or bonus token), so the output follows the
target distribution exactly (greedy: the tokens are identical to decoding without
speculation). See docs/engine.md, "Speculative decoding".

A proposer only sees sequences (``propose(seqs) -> drafts``): an n-gram lookup here; a
draft model or an EAGLE-style head implements the same interface (a proposer that also
returns draft probabilities passes them to the rejection sampler; None = point masses).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from .sequence import Sequence

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Validated ``speculative_config`` (vLLM's keys).

    method: "ngram" (prompt lookup over the sequence's own tokens).
    num_speculative_tokens: k, drafts per sequence and step (>= 1).
    prompt_lookup_min / prompt_lookup_max: n-gram sizes tried, longest first.
    disable_by_batch_size: no drafts in a step when more than this many sequences are
        running (a large batch is compute-bound: verifying drafts costs more than it
        saves; it also keeps the overlap scheduler for such batches). Default 32.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    disable_by_batch_size: int = 32

    @classmethod
    def from_dict(cls, cfg: "dict[str, Any] | SpeculativeConfig | None"
                  ) -> "SpeculativeConfig | None":
        if cfg is None or isinstance(cfg, SpeculativeConfig):
            return cfg
        if not isinstance(cfg, dict):
            raise TypeError(f"speculative_config must be a dict, got {type(cfg).__name__}")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min",
                 "prompt_lookup_max", "disable_by_batch_size"}
        extra = set(cfg) - known
        if extra:
            raise ValueError(f"speculative_config: unknown keys {sorted(extra)} (known: "
                             f"{sorted(known)})")
        method = cfg.get("method", "ngram")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got "
                             f"{method!r}")
        vals = {}
        for key, low in (("num_speculative_tokens", 1), ("prompt_lookup_min", 1),
                         ("prompt_lookup_max", 1), ("disable_by_batch_size", 1)):
            v = cfg.get(key, getattr(cls, key))
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"speculative_config.{key} must be an int >= {low}, got "
                                 f"{v!r}")
            vals[key] = v
        if vals["prompt_lookup_min"] > vals["prompt_lookup_max"]:
            raise ValueError("speculative_config.prompt_lookup_min must be <= "
                             "prompt_lookup_max")
        return cls(method=method, **vals)


class Proposer(ABC):
    """Drafts tokens for sequences. ``propose`` returns, per sequence, a list of at most
    ``max_tokens[i]`` draft token ids (may be empty), and optionally draft probabilities
    (None: each draft is a point mass, e.g. n-gram lookup)."""

    @abstractmethod
    def propose(self, seqs: "list[Sequence]", max_tokens: list[int]
                ) -> "tuple[list[list[int]], Tensor | None]":
        ...


class NgramProposer(Proposer):
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n
    tokens (n from prompt_lookup_max down to prompt_lookup_min) and propose the tokens
    that followed it."""

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.k = cfg.num_speculative_tokens
        self.n_min = cfg.prompt_lookup_min
        self.n_max = cfg.prompt_lookup_max

    def propose(self, seqs: "list[Sequence]", max_tokens: list[int]
                ) -> tuple[list[list[int]], None]:
        return [self.lookup(s.token_ids, min(self.k, m)) for s, m in zip(seqs, max_tokens)], None

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier match of the longest suffix."""
        L = len(tokens)
        if k <= 0 or L < self.n_min + 1:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            suffix = arr[L - n:]
            # candidate starts s in [0, L - n - 1]: the n-gram arr[s:s+n] ends before L - 1
            windows = np.lib.stride_tricks.sliding_window_view(arr[:L - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                s = int(hits[-1]) + n
                return arr[s:s + k].tolist()
        return []


def make_proposer(cfg: SpeculativeConfig) -> Proposer:
    if cfg.method == "ngram":
        return NgramProposer(cfg)
    raise ValueError(f"unknown speculative method {cfg.method!r}")  # pragma: no cover
