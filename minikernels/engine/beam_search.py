"""Beam search over the engine (vLLM's ``LLM.beam_search`` and ``BeamSearchParams``).

Each step runs every live beam as a one-token request through the batched engine (the
prefix cache serves the beam's tokens, so a step computes about one new token per beam)
and asks for the ``2 * beam_width`` most likely next tokens with their raw logprobs. Every
(beam, candidate) pair extends the beam's cumulative logprob; a candidate that is an EOS
token (unless ``ignore_eos``) ends its beam, which joins the finished set; the best
``beam_width`` unfinished extensions continue. At the end, finished and live beams are
ranked by :meth:`BeamSearchSequence.score`, the best ``beam_width`` returned.

Ties break by the order candidates are generated (beam order, then logprob rank), so the
search is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .llm_engine import LLM


@dataclass(frozen=True)
class BeamSearchParams:
    """beam_width >= 1 beams kept per prompt; max_tokens >= 1 new tokens at most;
    ignore_eos: never end a beam at EOS; length_penalty: the score divides the cumulative
    logprob by len ** length_penalty (0: no length normalization)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name, low in (("beam_width", 1), ("max_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"BeamSearchParams.{name} must be an int >= {low}, got "
                                 f"{value!r}")
        if not isinstance(self.length_penalty, (int, float)) or \
                self.length_penalty != self.length_penalty:
            raise ValueError(f"BeamSearchParams.length_penalty must be a number, got "
                             f"{self.length_penalty!r}")


@dataclass
class BeamSearchSequence:
    """One beam: the prompt and generated ``tokens`` (``tokens[:num_prompt_tokens]`` is
    the prompt), the generated tokens' logprobs, their sum, its text (generated part),
    and finish_reason ("stop": ended at EOS; "length": max_tokens or the context)."""

    tokens: list[int]
    num_prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]

    def score(self, length_penalty: float) -> float:
        """vLLM's beam score: cum_logprob / seq_len ** length_penalty, seq_len counting
        the prompt and the generated tokens but not a final EOS."""
        n = len(self.tokens) - (1 if self.finish_reason == "stop" else 0)
        return self.cum_logprob / (max(n, 1) ** length_penalty)


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search(llm: "LLM", prompts: Sequence[str | Sequence[int]],
                params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Beam search for each prompt (a string or token ids); see the module docstring."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
    engine = llm.llm_engine
    tok = llm.tokenizer
    eos = set() if params.ignore_eos else set(engine.eos_token_ids)
    width = params.beam_width
    starts = [engine.tokenize(p if isinstance(p, str) else list(p))[1] for p in prompts]
    for ids in starts:
        engine.validate(len(ids), SamplingParams(max_tokens=params.max_tokens))
    live = [[BeamSearchSequence(list(ids), len(ids))] for ids in starts]
    done: list[list[BeamSearchSequence]] = [[] for _ in starts]
    step_params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                 logprobs=2 * width)
    for _ in range(params.max_tokens):
        batch = [(i, b) for i, beams in enumerate(live) for b in beams]
        if not batch:
            break
        outs = llm.generate([b.tokens for _, b in batch], step_params, use_tqdm=False)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in starts]
        for (i, beam), out in zip(batch, outs):
            step_lp = (out.outputs[0].logprobs or [{}])[0]
            ranked = sorted(step_lp.items(), key=lambda kv: kv[1].rank)[:2 * width]
            for token, lp in ranked:
                new = BeamSearchSequence(beam.tokens + [token], beam.num_prompt_tokens,
                                         beam.logprobs + [lp.logprob],
                                         beam.cum_logprob + lp.logprob)
                if token in eos:
                    new.finish_reason = "stop"
                    done[i].append(new)
                else:
                    candidates[i].append(new)
        for i, cands in enumerate(candidates):
            cands.sort(key=lambda s: s.cum_logprob, reverse=True)  # stable: ties keep order
            live[i] = [s for s in cands[:width]
                       if len(s.tokens) < engine.max_model_len]
            done[i] += [s for s in cands[:width] if len(s.tokens) >= engine.max_model_len]
    results = []
    for i in range(len(starts)):
        for s in live[i]:
            s.finish_reason = s.finish_reason or "length"
        pool = done[i] + live[i]
        pool.sort(key=lambda s: s.score(params.length_penalty), reverse=True)
        best = pool[:width]
        for s in best:
            s.text = tok.decode(s.output_tokens) if tok is not None else None
            if s.finish_reason is None:
                s.finish_reason = "length"
        results.append(BeamSearchOutput(best))
    return results

