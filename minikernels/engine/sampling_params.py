"""SamplingParams: how one request is sampled and when it stops (vLLM's field names).

Every field is validated when the object is built; an error names the field and what was
expected, e.g. ``ValueError: SamplingParams.top_p must be in (0, 1], got 1.5``.
"""
from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from .structured_outputs import StructuredOutputsParams

_EPS = 1e-5  # temperatures below this are greedy

# Equal sampling keys share one tuple object, so a batch is checked for "all rows sample
# alike" by identity, without hashing a tuple per row. Bounded (keys hold user floats):
# when full it starts over, and equal keys made before and after merely compare unequal by
# identity (the sampler then takes its per-row path: slower, same result).
_KEYS: dict[tuple, tuple] = {}
_MAX_KEYS = 4096


def _interned(key: tuple) -> tuple:
    got = _KEYS.get(key)
    if got is None:
        if len(_KEYS) >= _MAX_KEYS:
            _KEYS.clear()
        got = _KEYS.setdefault(key, key)
    return got
_FP32_TINY = 1.1754943508222875e-38  # smallest normal float32
MAX_CACHE_SALT_CHARS = 4096


class RequestOutputKind(enum.IntEnum):
    """What AsyncLLM.generate yields for a request (vLLM's names).

    CUMULATIVE: each output holds everything so far (token_ids, text, logprobs), plus
        delta_token_ids / delta_text since the previous yield. The lists are the stream's
        own and keep growing on later iterations (copy them to keep a snapshot).
    DELTA:      each output holds only what is new since the previous yield (token_ids,
        text and logprobs are the delta; cheapest for streaming servers).
    FINAL_ONLY: one output, when the request finishes.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _to_float32(v: float) -> float:
    """``v`` rounded to float32 (inf when it overflows float32's range)."""
    try:
        return struct.unpack("<f", struct.pack("<f", float(v)))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request.

    Sampling (applied in this order to the fp32 logits of the last position):
        repetition_penalty  > 0; 1 = off. Logits of tokens seen in the prompt or output
                            are divided by it (positive) or multiplied (negative).
        presence_penalty    in [-2, 2]; subtracted once from tokens present in the output.
        frequency_penalty   in [-2, 2]; subtracted per occurrence in the output.
        logit_bias          None or {token id: bias in [-100, 100]} added to those logits
                            (OpenAI's; -100 bans a token in practice, 100 all but forces it).
        allowed_token_ids   None or a non-empty list: every other token is masked (vLLM's).
        temperature         >= 0; 0 = greedy (argmax).
        top_k               -1 (or 0) = off, else keep the k most likely tokens.
        top_p               in (0, 1]; keep the smallest set with cumulative prob >= top_p.
        min_p               in [0, 1]; drop tokens with prob < min_p * max prob.
        seed                int or None; a per-request generator makes sampling reproducible
                            whatever else is in the batch.
    Stopping:
        max_tokens          >= 1 new tokens at most (None = up to the model's max length).
        min_tokens          >= 0; EOS and stop_token_ids are suppressed before this many.
        stop                str or list of str; the output text is cut before the first
                            match (kept with include_stop_str_in_output=True).
        stop_token_ids      list of token ids that end the request (kept in token_ids).
        ignore_eos          do not stop at the model's EOS tokens.
    Output:
        n                   >= 1 independent completions of the prompt.
        logprobs            None, or >= 0: return the sampled token's logprob plus the top
                            ``logprobs`` alternatives per step (from the raw model logits).
        skip_special_tokens drop special tokens from the output text.
        spaces_between_special_tokens  vLLM's flag for slow (Python) tokenizers' joining
                            of special tokens; the fast tokenizers used here decode
                            without it (as in vLLM), so it is checked and carried only.
        bad_words           None or a list of words the output never contains (vLLM's
                            field; engine/bad_words.py): the token that would complete
                            one is masked. Needs a tokenizer; such rows are not drafted
                            for under speculative decoding.
        detokenize          False: no output text ("") and no logprob token texts
                            (``decoded_token`` None), only token ids (vLLM's field; stop
                            strings then raise ValueError).
        prompt_logprobs     None, or >= 0: also return, for every prompt token after the
                            first, its logprob given the tokens before it plus the top
                            ``prompt_logprobs`` alternatives (``RequestOutput.prompt_logprobs``;
                            vLLM's shape, None for the first token). Such a request never
                            reads the prefix cache (every prompt token is computed).
        truncate_prompt_tokens  None, -1 or k >= 1: keep only the last k prompt tokens
                            (left truncation; -1: the engine's max_model_len), as vLLM;
                            RequestOutput.prompt_token_ids are the kept ones.
        output_kind         RequestOutputKind: what AsyncLLM.generate yields (CUMULATIVE,
                            DELTA or FINAL_ONLY); LLM.generate always returns final outputs.
    Scheduling and caching:
        priority            int; lower runs first (ties: the earlier request). Waiting
                            requests are admitted in (priority, arrival) order and, when
                            KV blocks run out, the running sequence with the highest
                            (priority, arrival) is preempted first (vLLM's
                            scheduling_policy="priority"; all 0 = first come first served).
        cache_salt          None or a non-empty str mixed into the prefix-cache hash of the
                            first block: requests with different salts never share cached
                            KV blocks (separates users; a server salts per API key).
        lora_request        None or a LoRARequest (``LLM(enable_lora=True)``): the request
                            runs through that adapter (``generate(..., lora_request=)``
                            sets it, as vLLM's argument).
        structured_outputs  None or a StructuredOutputsParams (or a dict of its fields):
                            the output must match a JSON schema / any JSON object / a regex
                            / one of some choices / an EBNF grammar (xgrammar). The request
                            ends when the constraint is complete and nothing can follow.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    cache_salt: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    lora_request: Any = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled in by __post_init__: stop normalised to a list.
    stop_strings: list[str] = field(default_factory=list, init=False, repr=False)
    sampling_key: tuple = field(default=(), init=False, repr=False, compare=False)
    simple_stop: bool = field(default=True, init=False, repr=False, compare=False)
    # Per-row flags the engine reads for every row of every step (plain attributes: a
    # server batch holds one SamplingParams per request, so properties would be 256 calls)
    needs_host_tokens: bool = field(default=False, init=False, repr=False, compare=False)
    plain_row: bool = field(default=True, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_int("n", self.n, low=1)
        self._check_num("temperature", self.temperature, low=0.0)
        self._check_num("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        self._check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off), 0 (off) or >= 1, got "
                             f"{self.top_k}")
        self._check_num("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            self._check_int("seed", self.seed)
            # Sample i uses seed + i; torch generators take [-2**63, 2**64 - 1].
            if not -2 ** 63 <= self.seed <= 2 ** 64 - self.n:
                raise ValueError(f"SamplingParams.seed must be in [-2**63, 2**64 - n], got "
                                 f"{self.seed}")
        if self.max_tokens is not None:
            self._check_int("max_tokens", self.max_tokens, low=1)
        self._check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens ({self.min_tokens}) must be <= "
                             f"max_tokens ({self.max_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            self._check_num(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2], got {value}")
        self._check_num("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got "
                             f"{self.repetition_penalty}")
        # The sampler divides fp32 logits by it: its fp32 value must be a normal, finite
        # number (1e-50 rounds to 0 and 1e39 to inf in fp32: NaN probabilities).
        rp32 = _to_float32(self.repetition_penalty)
        if not (math.isfinite(rp32) and rp32 >= _FP32_TINY):
            raise ValueError(f"SamplingParams.repetition_penalty must be a positive number "
                             f"whose float32 value is finite and normal (in [1.2e-38, "
                             f"3.4e38]), got {self.repetition_penalty}")
        if self.logprobs is not None:
            self._check_int("logprobs", self.logprobs, low=0)
        if self.prompt_logprobs is not None:
            self._check_int("prompt_logprobs", self.prompt_logprobs, low=0)
        if self.truncate_prompt_tokens is not None:
            self._check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, low=-1)
            if self.truncate_prompt_tokens == 0:
                raise ValueError("SamplingParams.truncate_prompt_tokens must be >= 1 or -1 "
                                 "(the model's context length), got 0")
        self._check_int("priority", self.priority)
        if self.cache_salt is not None:
            if not isinstance(self.cache_salt, str):
                raise TypeError(f"SamplingParams.cache_salt must be a str or None, got "
                                f"{type(self.cache_salt).__name__}")
            if not self.cache_salt:
                raise ValueError("SamplingParams.cache_salt must be a non-empty str (or None)")
            if len(self.cache_salt) > MAX_CACHE_SALT_CHARS:
                raise ValueError(f"SamplingParams.cache_salt must be at most "
                                 f"{MAX_CACHE_SALT_CHARS} characters, got "
                                 f"{len(self.cache_salt)}")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and \
                not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise TypeError(f"SamplingParams.structured_outputs must be a "
                            f"StructuredOutputsParams, a dict or None, got "
                            f"{type(self.structured_outputs).__name__}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                     "spaces_between_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SamplingParams.{name} must be a bool, got "
                                f"{type(getattr(self, name)).__name__}")
        if self.stop is None:
            stops: list[str] = []
        elif isinstance(self.stop, str):
            stops = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            stops = list(self.stop)
        else:
            raise TypeError(f"SamplingParams.stop must be a str or a list of str, got "
                            f"{type(self.stop).__name__}")
        for s in stops:
            if not isinstance(s, str):
                raise TypeError(f"SamplingParams.stop must hold only str, got "
                                f"{type(s).__name__}")
            if not s:
                raise ValueError("SamplingParams.stop must not contain an empty string")
        if stops and not self.detokenize:
            raise ValueError("SamplingParams.stop strings need detokenize=True (they are "
                             "matched in the output text)")
        self.stop_strings = stops
        # What the sampler needs to know to treat rows alike (params are read-only once
        # built); and whether the stop check is only EOS + length.
        self.sampling_key = _interned((self.greedy, self.temperature, self.top_p, self.top_k,
                                       self.min_p, self.seed is not None,
                                       self.presence_penalty, self.frequency_penalty,
                                       self.repetition_penalty))
        self.simple_stop = not stops and not self.stop_token_ids and self.min_tokens == 0
        self._check_bad_words()
        # the next step needs this step's tokens on the host (penalty counts, grammars,
        # bad words)
        self.needs_host_tokens = self.uses_penalties or self.uses_grammar or \
            self.bad_words is not None
        # the sampler needs nothing but the sampling_key fields for this row
        self._check_logit_bias()
        self.plain_row = (self.logprobs is None and not self.uses_penalties
                          and self.min_tokens == 0 and not self.uses_logit_bias
                          and self.bad_words is None)
        if not isinstance(self.output_kind, RequestOutputKind):
            try:
                self.output_kind = RequestOutputKind(self.output_kind)
            except ValueError:
                raise ValueError(f"SamplingParams.output_kind must be a RequestOutputKind, "
                                 f"got {self.output_kind!r}") from None
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)):
            raise TypeError(f"SamplingParams.stop_token_ids must be a list of int, got "
                            f"{type(self.stop_token_ids).__name__}")
        else:
            for t in self.stop_token_ids:
                if not _is_int(t) or t < 0:
                    raise ValueError(f"SamplingParams.stop_token_ids must hold ints >= 0, "
                                     f"got {t!r}")
            self.stop_token_ids = list(self.stop_token_ids)

    def _check_logit_bias(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(f"SamplingParams.logit_bias must be a dict of token id -> "
                                f"bias, got {type(self.logit_bias).__name__}")
            for t, b in self.logit_bias.items():
                if not _is_int(t) or t < 0:
                    raise ValueError(f"SamplingParams.logit_bias keys must be token ids "
                                     f"(ints >= 0), got {t!r}")
                self._check_num(f"logit_bias[{t}]", b)
                if not -100.0 <= b <= 100.0:
                    raise ValueError(f"SamplingParams.logit_bias[{t}] must be in "
                                     f"[-100, 100], got {b}")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or \
                    not self.allowed_token_ids:
                raise ValueError("SamplingParams.allowed_token_ids must be a non-empty list "
                                 "of token ids")
            for t in self.allowed_token_ids:
                if not _is_int(t) or t < 0:
                    raise ValueError(f"SamplingParams.allowed_token_ids must hold ints "
                                     f">= 0, got {t!r}")
            self.allowed_token_ids = list(self.allowed_token_ids)

    def _check_bad_words(self) -> None:
        if self.bad_words is None:
            return
        if isinstance(self.bad_words, str) or not isinstance(self.bad_words, (list, tuple)):
            raise TypeError(f"SamplingParams.bad_words must be a list of str, got "
                            f"{type(self.bad_words).__name__}")
        for w in self.bad_words:
            if not isinstance(w, str):
                raise TypeError(f"SamplingParams.bad_words must hold only str, got "
                                f"{type(w).__name__}")
            if not w.strip():
                raise ValueError("SamplingParams.bad_words must not contain an empty or "
                                 "blank string")
        self.bad_words = list(self.bad_words) or None

    @property
    def uses_logit_bias(self) -> bool:
        """logit_bias or allowed_token_ids: the sampler edits this row's logits."""
        return self.logit_bias is not None or self.allowed_token_ids is not None

    def max_biased_token_id(self) -> int:
        """The largest token id of logit_bias / allowed_token_ids (-1: none): the engine
        checks it against the vocabulary."""
        return max(list(self.logit_bias or {}) + list(self.allowed_token_ids or []),
                   default=-1)

    @staticmethod
    def _check_int(name: str, value: object, low: int | None = None) -> None:
        if not _is_int(value):
            raise TypeError(f"SamplingParams.{name} must be an int, got "
                            f"{type(value).__name__} ({value!r})")
        if low is not None and value < low:  # type: ignore[operator]
            raise ValueError(f"SamplingParams.{name} must be >= {low}, got {value}")

    @staticmethod
    def _check_num(name: str, value: object, low: float | None = None) -> None:
        if not _is_num(value):
            raise TypeError(f"SamplingParams.{name} must be a number, got "
                            f"{type(value).__name__} ({value!r})")
        if value != value:  # NaN
            raise ValueError(f"SamplingParams.{name} must not be NaN")
        if value in (float("inf"), float("-inf")):  # e.g. -inf logits / inf temperature = NaN
            raise ValueError(f"SamplingParams.{name} must be finite, got {value}")
        if low is not None and value < low:  # type: ignore[operator]
            raise ValueError(f"SamplingParams.{name} must be >= {low}, got {value}")

    # ------------------------------------------------------------------ derived flags
    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0 and not self.greedy

    @property
    def uses_top_p(self) -> bool:
        return self.top_p < 1.0 and not self.greedy

    @property
    def uses_min_p(self) -> bool:
        return self.min_p > 0.0 and not self.greedy

    @property
    def uses_grammar(self) -> bool:
        """A structured-output constraint: each step's mask needs the previous token."""
        return self.structured_outputs is not None

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
