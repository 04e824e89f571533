"""Request and Sequence: the engine's per-request state.

A Request is what a user submitted (one prompt, one SamplingParams); it owns ``n``
Sequences, one per completion. The scheduler, block manager and model runner work on
Sequences only.

A Sequence's tokens are ``token_ids = prompt + output``. ``num_computed_tokens`` of them
have their K/V in the cache (in the blocks of ``block_table``); the rest are computed by
the next steps. A preempted sequence drops its blocks and sets num_computed_tokens to 0;
its generated tokens stay, so it resumes by recomputing them as a longer prompt.
"""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any

from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, a few tokens at a time.

    Decodes only a short window (the last ``prefix_offset`` .. end tokens) per step, so the
    cost per token is O(1) rather than re-decoding the whole output. A step whose text
    ends in an incomplete UTF-8 character (U+FFFD) waits for the next token. The window
    starts on the last few prompt tokens so the first output token gets its leading space
    right (SentencePiece-style tokenizers).
    """

    _PROMPT_CONTEXT = 4

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        tail = list(prompt_token_ids[-self._PROMPT_CONTEXT:])
        self.ids: list[int] = tail
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_ids: list[int]) -> str:
        """Add new output tokens; return the text they complete (may be "")."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end: take the held-back tail too (an incomplete character decodes to
        U+FFFD, as a one-shot decode of the whole output would)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


class Sequence:
    """One completion being generated (see the module docstring)."""

    def __init__(self, seq_id: int, request: "Request", index: int,
                 generator: "torch.Generator | None" = None) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.params: SamplingParams = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chained hashes of this sequence's full blocks (by content; survive preemption)
        # and how many of its current blocks were offered to the prefix cache.
        self.block_hashes: list[bytes] = []  # chained SHA-256 of full blocks
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0       # prompt tokens served by the prefix cache
        self.status = SequenceStatus.WAITING
        self.generator = generator
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] | None = (
            [] if self.params.logprobs is not None else None)
        self.num_preemptions = 0
        # Text: incremental (streaming or stop strings) or decoded once at the end.
        self.detokenizer: IncrementalDetokenizer | None = None
        self._final_text: str | None = None
        self.stop_hold = 0  # chars held back while they could start a stop string

    # ---------------------------------------------------------------- token views
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # ---------------------------------------------------------------- text
    def text(self) -> str:
        """Output text so far (without a partial stop string at the end)."""
        if self.detokenizer is not None:
            t = self.detokenizer.text
            if self.stop_hold and not self.is_finished:
                return t[:max(0, len(t) - self.stop_hold)]
            return t
        if self._final_text is not None:
            return self._final_text
        tok = self.request.tokenizer
        if tok is None:
            return ""
        return tok.decode(self.output_token_ids,
                          skip_special_tokens=self.params.skip_special_tokens)

    def finalize_text(self) -> None:
        """Decode the output once when the sequence finishes (non-incremental mode)."""
        if self.detokenizer is None and self._final_text is None:
            tok = self.request.tokenizer
            self._final_text = "" if tok is None else tok.decode(
                self.output_token_ids, skip_special_tokens=self.params.skip_special_tokens)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request.request_id!r}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, status={self.status.value})")


class Request:
    """A submitted prompt with its SamplingParams and its ``n`` Sequences."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer: Any = None,
                 arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.seqs: list[Sequence] = []
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        # Lengths already delivered to a streaming consumer (for delta fields).
        self._sent_text: list[int] = []
        self._sent_tokens: list[int] = []

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def to_output(self, delta: bool = False) -> RequestOutput:
        """A snapshot of this request (copies; safe to hand to another thread).

        delta=True fills delta_text/delta_token_ids with what is new since the previous
        delta snapshot (and remembers the new lengths).
        """
        if len(self._sent_text) != len(self.seqs):
            self._sent_text = [0] * len(self.seqs)
            self._sent_tokens = [0] * len(self.seqs)
        outs = []
        for i, s in enumerate(self.seqs):
            text = s.text()
            ids = s.output_token_ids
            if delta:
                d_text, d_ids = text[self._sent_text[i]:], ids[self._sent_tokens[i]:]
                self._sent_text[i], self._sent_tokens[i] = len(text), len(ids)
            else:
                d_text, d_ids = text, ids
            want_lp = s.params.logprobs is not None
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=ids,
                cumulative_logprob=s.cumulative_logprob if want_lp else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                delta_text=d_text, delta_token_ids=d_ids))
        metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                   "finished_time": self.finish_time,
                   "num_preemptions": sum(s.num_preemptions for s in self.seqs)}
        cached = max((s.num_cached_tokens for s in self.seqs), default=0)
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=list(self.prompt_token_ids), outputs=outs,
                             finished=self.finished, metrics=metrics, num_cached_tokens=cached)
