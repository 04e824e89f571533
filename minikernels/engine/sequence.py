"""Request and Sequence: the engine's per-request state.

A Request is what a user submitted (one prompt, one SamplingParams); it owns ``n``
Sequences, one per completion. The scheduler, block manager and model runner work on
Sequences only.

A Sequence's known tokens are ``token_ids = prompt + output``. ``num_computed_tokens``
of them have their K/V in the cache (in the blocks of ``block_table``) or are being
computed by a launched step. With async scheduling, ``num_pending`` (0 or 1) more tokens
were sampled by the step in flight and are still on the device (row ``pending_row`` of
that step's sampled tokens); they count for scheduling but not in ``token_ids`` yet.
A preempted sequence drops its blocks and sets num_computed_tokens to 0; its generated
tokens stay, so it resumes by recomputing them as a longer prompt.

Streaming: ``take_delta()`` hands out what is new since its last call (token ids, text,
logprobs) in O(new), so a step costs the same at token 10 and token 10,000.
"""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any

from .detokenizer import WindowDetokenizer, make_detokenizer
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from .detokenizer import _BaseDetokenizer

# Kept for callers of the old name: the generic (any tokenizer) incremental detokenizer.
IncrementalDetokenizer = WindowDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion being generated (see the module docstring).

    ``max_total_tokens``: prompt + max_tokens capped by max_model_len; reaching it ends
    the sequence with finish_reason "length" (so the scheduler knows it in advance).
    """

    __slots__ = ("seq_id", "request", "index", "params", "token_ids", "num_prompt_tokens",
                 "num_computed_tokens", "num_pending", "pending_row", "max_total_tokens",
                 "block_table", "block_row", "block_hashes", "num_registered_blocks",
                 "swa_blocks", "swa_lo",
                 "num_cached_tokens", "status", "generator", "finish_reason", "stop_reason",
                 "cumulative_logprob", "logprobs", "num_preemptions", "detokenizer",
                 "_final_text", "stop_hold", "unsent_text", "num_emitted_tokens",
                 "prompt_lp_next", "grammar", "spec_token_ids", "num_draft_tokens",
                 "num_accepted_tokens", "num_spec_steps", "state_restore")

    def __init__(self, seq_id: int, request: "Request", index: int,
                 generator: "torch.Generator | None" = None,
                 max_model_len: int | None = None) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.params: SamplingParams = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        # A copied list has no spare capacity: its first append (inside an engine step)
        # would reallocate and copy it (~3 us for 2k tokens; a wave of 256 admissions
        # pays ~1 ms in one step). Grow it here instead (append + pop keeps the ~1/8
        # headroom CPython over-allocates).
        self.token_ids.append(0)
        self.token_ids.pop()
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_pending = 0          # sampled on the device, not yet in token_ids
        self.pending_row = -1         # their row in the in-flight step's sampled tokens
        limit = max_model_len if max_model_len is not None else 1 << 62
        if self.params.max_tokens is not None:
            limit = min(limit, self.num_prompt_tokens + self.params.max_tokens)
        self.max_total_tokens = limit
        self.block_table: list[int] = []
        self.block_row = -1           # this sequence's row in the block manager's table
        # Hybrid KV pools: the sliding-window groups' block ids per block of block_table
        # (a tuple, one id per group; None once behind the window) and the first entry
        # that may still hold blocks (engine/block_manager.py).
        self.swa_blocks: list[tuple[int, ...] | None] = []
        self.swa_lo = 0
        # Chained hashes of this sequence's full blocks (by content; survive preemption)
        # and how many of its current blocks were offered to the prefix cache.
        self.block_hashes: list[bytes] = []
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
        self.detokenizer: _BaseDetokenizer | None = None
        self._final_text: str | None = None
        self.stop_hold = 0         # chars held back while they could start a stop string
        self.unsent_text = ""      # text not yet handed out by take_delta
        self.num_emitted_tokens = 0
        # Prompt logprobs (sample 0 of a request asking for them): positions below this
        # one had their logits rows launched (a recompute after preemption skips them).
        self.prompt_lp_next = 0
        # Structured outputs: this sample's grammar matcher (engine/structured_outputs.py);
        # it lives here, so it survives preemption (a recompute replays no output token).
        self.grammar: Any = None
        # Speculative decoding (engine/spec_decode.py): the draft tokens scheduled in this
        # step (verified by the step's forward; [] otherwise) and counters.
        self.spec_token_ids: list[int] = []
        self.num_draft_tokens = 0        # drafts verified
        self.num_accepted_tokens = 0     # of them accepted
        self.num_spec_steps = 0          # verification rows (steps with drafts)
        # hybrid recurrent models: the state checkpoint slot its prefix hit starts from
        # (engine/state_cache.py; -1: none)
        self.state_restore = -1

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether this sequence computes its request's prompt logprobs (sample 0 only)."""
        return self.index == 0 and self.params.prompt_logprobs is not None

    def start_detokenizer(self, tokenizer: Any, stop_hold: int = 0) -> None:
        """Decode incrementally from now on (streaming or stop strings)."""
        self.detokenizer = make_detokenizer(tokenizer, self.token_ids[:self.num_prompt_tokens],
                                            self.params.skip_special_tokens)
        self.stop_hold = stop_hold

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
    def add_text(self, delta: str) -> None:
        """Record newly decoded text (the engine's stop check calls this)."""
        if delta:
            self.unsent_text += delta

    def cut_text(self, keep_chars: int) -> None:
        """A stop string matched: keep only the first keep_chars characters of the text.
        The cut part was never handed out (stop_hold keeps it back)."""
        det = self.detokenizer
        drop = det.num_chars - keep_chars
        det.cut(keep_chars)
        if drop > 0:
            self.unsent_text = self.unsent_text[:max(0, len(self.unsent_text) - drop)]

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
        if tok is None or not self.params.detokenize:
            return ""
        return tok.decode(self.output_token_ids,
                          skip_special_tokens=self.params.skip_special_tokens)

    def finalize_text(self) -> None:
        """Decode the output once when the sequence finishes (non-incremental mode)."""
        if self.detokenizer is None and self._final_text is None:
            tok = self.request.tokenizer if self.params.detokenize else None
            self._final_text = "" if tok is None else tok.decode(
                self.output_token_ids, skip_special_tokens=self.params.skip_special_tokens)
            self.unsent_text = self._final_text

    def take_delta(self) -> tuple[list[int], str, list[dict[int, Logprob]] | None]:
        """(new token ids, new text, new logprobs) since the previous call.

        Text that could still start a stop string stays back until it is resolved, so
        the concatenated deltas never retract. Without the incremental detokenizer the
        whole text comes in the delta taken after the sequence finishes.
        """
        start = self.num_prompt_tokens + self.num_emitted_tokens
        ids = self.token_ids[start:]
        lps = None
        if self.logprobs is not None:
            lps = self.logprobs[self.num_emitted_tokens:]
        self.num_emitted_tokens += len(ids)
        text = self.unsent_text
        hold = self.stop_hold if not self.is_finished else 0
        if hold and text:
            cut = max(0, len(text) - hold)
            self.unsent_text = text[cut:]
            text = text[:cut]
        else:
            self.unsent_text = ""
        return ids, text, lps

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request.request_id!r}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, status={self.status.value})")


class Request:
    """A submitted prompt with its SamplingParams and its ``n`` Sequences."""

    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "tokenizer", "seqs",
                 "arrival_time", "first_token_time", "finish_time", "num_finished",
                 "prompt_logprobs", "bad_words_ids")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer: Any = None,
                 arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.seqs: list[Sequence] = []
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_finished = 0
        # vLLM's shape: None for the first prompt token, then {token_id: Logprob} (the
        # prompt token and the top alternatives) per prompt token, filled as the prompt's
        # chunks are computed; None unless params.prompt_logprobs is set.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        # params.bad_words as token-id sequences (engine/bad_words.py), set when added
        self.bad_words_ids: list[list[int]] = []

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        return max((s.num_cached_tokens for s in self.seqs), default=0)

    @property
    def metrics(self) -> dict[str, Any]:
        drafts = sum(s.num_draft_tokens for s in self.seqs)
        accepted = sum(s.num_accepted_tokens for s in self.seqs)
        rows = sum(s.num_spec_steps for s in self.seqs)
        return {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                "finished_time": self.finish_time,
                "num_preemptions": sum(s.num_preemptions for s in self.seqs),
                # speculative decoding: drafts verified / accepted; tokens emitted per
                # verification (accepted + the target's own token), 0 without drafts
                "spec_num_draft_tokens": drafts, "spec_num_accepted_tokens": accepted,
                "spec_mean_acceptance_length": (accepted + rows) / rows if rows else 0.0}

    def to_output(self) -> RequestOutput:
        """A full (cumulative) snapshot of this request; the lists are copies."""
        outs = []
        for s in self.seqs:
            text = s.text()
            ids = s.output_token_ids
            want_lp = s.params.logprobs is not None
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=ids,
                cumulative_logprob=s.cumulative_logprob if want_lp else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                delta_text=text, delta_token_ids=ids))
        out = RequestOutput(request_id=self.request_id, prompt=self.prompt,
                            prompt_token_ids=list(self.prompt_token_ids), outputs=outs,
                            finished=self.finished, metrics=self.metrics,
                            num_cached_tokens=self.num_cached_tokens)
        # vLLM's RequestOutput.prompt_logprobs (set as an attribute: outputs.py declares
        # the field once AsyncLLM's streaming outputs carry it too).
        out.prompt_logprobs = (list(self.prompt_logprobs)
                               if self.prompt_logprobs is not None else None)
        return out
