"""Speculative decoding: configuration and draft proposers.

``LLM(..., speculative_config={"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_min": 1, "prompt_lookup_max": 4})`` or ``{"method": "draft_model",
"model": <HF dir, hub id or built-in name>, "num_speculative_tokens": k}``. Each step, a
running sequence in steady decode gets up to k draft tokens from a :class:`Proposer`;
the target model scores its last token plus the drafts in one forward (a prefill-style
row with 1 + k query tokens over its paged prefix), and ``ops.rejection_sample`` keeps
the accepted prefix plus one token from the target (the recovered or bonus token), so
the output follows the target distribution exactly (greedy: the tokens are identical to
decoding without speculation). See docs/engine.md, "Speculative decoding".

A proposer only sees sequences (``propose(seqs, max_tokens) -> (drafts, draft_probs)``):
an n-gram lookup here (point masses: draft_probs None); a draft model
(engine/draft_model.py: its own paged KV pool, returns the probabilities it sampled
from) and an EAGLE-1 / EAGLE-3 head (engine/eagle.py: the target's hidden states, its
K/V in the target's blocks) implement the same interface. ``release(seq)`` drops
per-sequence state (finished, aborted, preempted).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from .sequence import Sequence

METHODS = ("ngram", "draft_model", "eagle", "eagle3")
_COMMON_KEYS = ("method", "num_speculative_tokens", "disable_by_batch_size")
_METHOD_KEYS = {"ngram": ("prompt_lookup_min", "prompt_lookup_max"),
                "draft_model": ("model", "quantization", "revision"),
                "eagle": ("model", "revision"), "eagle3": ("model", "revision")}
_QUANTIZATIONS = ("auto", None, "int4", "gptq", "awq", "fp8", "fp8_w8a8", "int8", "mxfp4",
                  "dense")  # + loader's


@dataclass(frozen=True)
class SpeculativeConfig:
    """Validated ``speculative_config`` (vLLM's keys).

    method: "ngram" (prompt lookup over the sequence's own tokens), "draft_model" (a
        smaller CausalLM with the target's vocabulary), "eagle" or "eagle3" (an EAGLE-1 /
        EAGLE-3 head drafting from the target's hidden states, engine/eagle.py).
        Default: "draft_model" when ``model`` is given, else "ngram" (vLLM's inference).
    num_speculative_tokens: k, drafts per sequence and step (>= 1).
    prompt_lookup_min / prompt_lookup_max (ngram): n-gram sizes tried, longest first.
    model (draft_model, required): a HF checkpoint directory, a hub id or a built-in
        name (loaded like the target: same dtype and device), or an already built
        CausalLM. (eagle / eagle3, required): the EAGLE head's HF directory or hub id
        (models/eagle.py), or an EagleHead built over the target model.
    quantization (draft_model): the draft's quantization: None | "int4" | "gptq" |
        "awq" | "fp8", or "auto" (default): "int4" / "fp8" when the target was quantized
        with that RTN on load, else None (a quantized checkpoint declares its own).
    revision (draft_model, eagle, eagle3): hub branch, tag or commit of ``model``.
    disable_by_batch_size: no drafts in a step when more than this many sequences are
        running (a large batch is compute-bound: verifying drafts costs more than it
        saves; it also keeps the overlap scheduler for such batches). Default 32.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    disable_by_batch_size: int = 32
    model: Any = None
    quantization: str | None = "auto"
    revision: str | None = None

    @classmethod
    def from_dict(cls, cfg: "dict[str, Any] | SpeculativeConfig | None"
                  ) -> "SpeculativeConfig | None":
        if cfg is None or isinstance(cfg, SpeculativeConfig):
            return cfg
        if not isinstance(cfg, dict):
            raise TypeError(f"speculative_config must be a dict, got {type(cfg).__name__}")
        known = set(_COMMON_KEYS).union(*_METHOD_KEYS.values())
        extra = set(cfg) - known
        if extra:
            raise ValueError(f"speculative_config: unknown keys {sorted(extra)} (known: "
                             f"{sorted(known)})")
        method = cfg.get("method", "draft_model" if "model" in cfg else "ngram")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got "
                             f"{method!r}")
        for other, keys in _METHOD_KEYS.items():
            if other != method:
                wrong = sorted(k for k in keys if k in cfg and k not in _METHOD_KEYS[method])
                if wrong:
                    raise ValueError(f"speculative_config.{wrong[0]} applies to method "
                                     f"{other!r}, not {method!r}")
        vals: dict[str, Any] = {}
        ints = [("num_speculative_tokens", 1), ("disable_by_batch_size", 1)]
        if method == "ngram":
            ints += [("prompt_lookup_min", 1), ("prompt_lookup_max", 1)]
        for key, low in ints:
            v = cfg.get(key, getattr(cls, key))
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"speculative_config.{key} must be an int >= {low}, got "
                                 f"{v!r}")
            vals[key] = v
        if method == "ngram" and vals["prompt_lookup_min"] > vals["prompt_lookup_max"]:
            raise ValueError("speculative_config.prompt_lookup_min must be <= "
                             "prompt_lookup_max")
        if method == "draft_model":
            model = cfg.get("model")
            if model is None:
                raise ValueError("speculative_config.model is required for method "
                                 "'draft_model' (a HF directory, hub id or built-in name)")
            if isinstance(model, str):
                if not model.strip():
                    raise ValueError("speculative_config.model must not be empty")
            elif not hasattr(model, "config") or not callable(model):
                raise ValueError(f"speculative_config.model must be a model path / name "
                                 f"(str) or a CausalLM, got {type(model).__name__}")
            quant = cfg.get("quantization", "auto")
            if isinstance(quant, str):
                quant = quant.lower()
            if quant not in _QUANTIZATIONS:
                raise ValueError(f"speculative_config.quantization must be one of "
                                 f"{_QUANTIZATIONS}, got {cfg.get('quantization')!r}")
            vals.update(model=model, quantization=quant, revision=_revision(cfg))
        if method in ("eagle", "eagle3"):
            model = cfg.get("model")
            built = hasattr(model, "capture") and hasattr(model, "combine")   # an EagleHead
            if not built and (not isinstance(model, str) or not model.strip()):
                raise ValueError(f"speculative_config.model is required for method "
                                 f"{method!r}: the EAGLE head's HF directory or hub id (or "
                                 f"a built EagleHead), got {model!r}")
            vals.update(model=model, revision=_revision(cfg), quantization=None)
        return cls(method=method, **vals)


def _revision(cfg: dict[str, Any]) -> str | None:
    rev = cfg.get("revision")
    if rev is not None and not isinstance(rev, str):
        raise ValueError(f"speculative_config.revision must be a str or None, got {rev!r}")
    return rev


class Proposer(ABC):
    """Drafts tokens for sequences. ``propose`` returns, per sequence, a list of at most
    ``max_tokens[i]`` draft token ids (may be empty), and optionally draft probabilities
    (None: each draft is a point mass, e.g. n-gram lookup)."""

    @abstractmethod
    def propose(self, seqs: "list[Sequence]", max_tokens: list[int]
                ) -> "tuple[list[list[int]], Tensor | None]":
        """drafts[i] for seqs[i] (len <= max_tokens[i]); draft_probs: fp32 [len(seqs), k,
        V] on the device (row i, position j: the distribution drafts[i][j] was sampled
        from; rows of greedy sequences and positions past len(drafts[i]) are ignored)
        or None (every draft is a point mass)."""

    def release(self, seq: "Sequence") -> None:
        """Forget seq's state (it finished, was aborted or preempted). Default: none."""

    def check_invariants(self) -> None:
        """AssertionError unless the proposer's own accounting is consistent."""


class NgramIndex:
    """The latest start of every n-gram (n_min <= n <= n_max) of one growing token list
    that ends before its last token, kept up to date as tokens are appended: a lookup
    is a few dict reads instead of a scan of the whole sequence (~0.4 ms at 4k tokens).

    Keys pack the n token ids into one int (21 bits each), one dict per n. Tokens are
    only ever appended (rejected drafts never enter a sequence's tokens), so the index
    only grows; ``indexed`` is how many tokens it has seen.
    """

    __slots__ = ("n_min", "n_max", "last", "indexed")
    BITS = 21

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.last: list[dict[int, int]] = [{} for _ in range(n_max + 1)]
        self.indexed = 0

    def update(self, tokens: "list[int]") -> None:
        """Index the n-grams ending at positions (exclusive) up to len(tokens) - 1."""
        bits, last, n_max = self.BITS, self.last, self.n_max
        for e in range(max(self.indexed, 1), len(tokens)):   # n-grams ending at e - 1
            key = 0
            for n in range(1, min(n_max, e) + 1):
                key |= tokens[e - n] << (bits * (n - 1))
                last[n][key] = e - n
        self.indexed = max(self.indexed, len(tokens))

    def lookup(self, tokens: "list[int]", k: int) -> list[int]:
        """As :meth:`NgramProposer.lookup`, from the index (``update`` it first)."""
        L = len(tokens)
        if k <= 0 or L < self.n_min + 1:
            return []
        bits = self.BITS
        keys = [0]
        for n in range(1, min(self.n_max, L - 1) + 1):
            keys.append(keys[-1] | tokens[L - n] << (bits * (n - 1)))
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            s = self.last[n].get(keys[n])
            if s is not None:
                return list(tokens[s + n:s + n + k])
        return []


class NgramProposer(Proposer):
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n
    tokens (n from prompt_lookup_max down to prompt_lookup_min) and propose the tokens
    that followed it. Each sequence keeps an incremental :class:`NgramIndex` (token ids
    below 2^21; otherwise the scan of :meth:`lookup`, the reference)."""

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.k = cfg.num_speculative_tokens
        self.n_min = cfg.prompt_lookup_min
        self.n_max = cfg.prompt_lookup_max
        self.indexes: dict[int, NgramIndex] = {}

    def propose(self, seqs: "list[Sequence]", max_tokens: list[int]
                ) -> tuple[list[list[int]], None]:
        out = []
        for s, m in zip(seqs, max_tokens):
            toks = s.token_ids
            idx = self.indexes.get(s.seq_id)
            if idx is None:
                if max(toks, default=0) >> NgramIndex.BITS:
                    out.append(self.lookup(toks, min(self.k, m)))
                    continue
                idx = self.indexes[s.seq_id] = NgramIndex(self.n_min, self.n_max)
            idx.update(toks)
            out.append(idx.lookup(toks, min(self.k, m)))
        return out, None

    def release(self, seq: "Sequence") -> None:
        self.indexes.pop(seq.seq_id, None)

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
    """The proposer of a method that needs nothing from the engine (n-gram); the engine
    builds a :class:`~minikernels.engine.draft_model.DraftModelProposer` itself (it
    shares the KV budget and device)."""
    if cfg.method == "ngram":
        return NgramProposer(cfg)
    raise ValueError(f"speculative method {cfg.method!r} is built by the engine")
