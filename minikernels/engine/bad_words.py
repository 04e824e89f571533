"""``SamplingParams.bad_words`` (vLLM's field): words the output must never contain.

Each word becomes token-id sequences once per request (:func:`tokenize_bad_words`): its
encoding without special tokens, and, when a leading space makes a different first
token of the same length (the word in the middle of a text), that encoding too. At every
step a sequence's next token is banned (logit -inf) when it would complete one of them:
a one-token word always, a longer one when the sequence's last output tokens equal the
word's tokens but its last (:func:`banned_next_tokens`). Only output tokens count, as
in vLLM; a word the prompt ends with is not completed by the first output token.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def tokenize_bad_words(words: Sequence[str], tokenizer: Any, vocab_size: int
                       ) -> list[list[int]]:
    """The token-id sequences of ``words`` (see the module docstring); ValueError naming
    ``bad_words`` when there is no tokenizer or an id is outside the vocabulary."""
    if tokenizer is None:
        raise ValueError("SamplingParams.bad_words needs the model's tokenizer (this "
                         "engine has none)")
    out: list[list[int]] = []
    for word in words:
        bare = [int(t) for t in tokenizer.encode(word.lstrip(), add_special_tokens=False)]
        if bare:
            out.append(bare)
        spaced = [int(t) for t in tokenizer.encode(" " + word.lstrip(),
                                                   add_special_tokens=False)]
        if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
            out.append(spaced)
    bad = [t for ids in out for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"SamplingParams.bad_words tokenize to ids outside the vocabulary "
                         f"[0, {vocab_size}): {bad[:5]}")
    return out


def banned_next_tokens(bad_ids: list[list[int]], output: Sequence[int]) -> list[int]:
    """Token ids the next token must not be: the last token of every sequence in
    ``bad_ids`` whose other tokens end ``output`` (the sequence's output ids so far)."""
    n = len(output)
    banned = []
    for ids in bad_ids:
        k = len(ids) - 1
        if k > n:
            continue
        if k == 0 or list(output[n - k:]) == ids[:k]:
            banned.append(ids[-1])
    return banned
