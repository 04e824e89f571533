"""Request results in vLLM's shape: RequestOutput holds one CompletionOutput per sample.

The classes use ``__slots__`` (a streaming server builds one RequestOutput and one
CompletionOutput per request per engine step); fields are positional in this order.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """Log-probability of one token at one step (from the raw model logits).

    rank: 1 = the most likely token. decoded_token: its text (None without a tokenizer).
    """

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a prompt.

    index:              which of the request's ``n`` samples this is.
    text:               the output text so far (cut before a matched stop string).
    token_ids:          every generated token so far (EOS / stop token included).
    cumulative_logprob: sum of the sampled tokens' logprobs (None unless logprobs asked).
    logprobs:           per generated token, {token_id: Logprob} with the sampled token and
                        the top-``logprobs`` alternatives (None unless asked).
    finish_reason:      None while running, else "stop" (EOS, stop token or stop string),
                        "length" (max_tokens or the model's max length) or "abort".
    stop_reason:        the stop string or stop token id that matched (None for EOS).
    delta_text / delta_token_ids: what is new since the previous snapshot delivered to the
                        same consumer (streaming; equals text/token_ids in LLM.generate).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: its prompt and its ``n`` completions so far.

    finished is True once every completion has a finish_reason. metrics holds timing in
    seconds (arrival, first_token, finished; perf_counter clock) and num_cached_tokens
    (prompt tokens served from the prefix cache). prompt_logprobs (vLLM's shape, when
    ``SamplingParams.prompt_logprobs`` is set): None for the first prompt token, then
    {token_id: Logprob} per prompt token; a DELTA stream carries it on the first output
    with tokens only.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None
