"""Prompts -> token ids off the event loop, with the cheap length checks first.

Tokenizing (and rendering a chat template) is CPU work proportional to the prompt; on the
event loop a 10 MB prompt froze every stream and ``/health`` for seconds. Here:

1. A text prompt longer than ``max_model_len * max_chars_per_token`` characters cannot
   fit whatever it tokenizes to, so it is refused before any tokenizing.
2. Tokenizing runs on a small dedicated thread pool (HF tokenizers release the GIL), so
   the event loop keeps serving while it runs.
3. ``truncate_prompt_tokens = k`` keeps the last ``k`` tokens (vLLM's left truncation;
   ``-1`` = the context length); only the text's tail that can hold them is tokenized.
4. prompt + ``max_tokens`` must fit the context (400 ``context_length_exceeded``).

The engine then gets token ids, so it never tokenizes on the event loop either.
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar, Union

from ..models.tokenizer import ByteTokenizer
from .chat import render_chat
from .errors import APIError

T = TypeVar("T")

_DEFAULT_CHARS_PER_TOKEN = 64


def max_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on how many prompt characters one token can cover.

    Byte-level BPE vocabularies spell each byte as one character, SentencePiece ones each
    character as one, so the longest vocabulary entry bounds the characters per token.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return 1                                   # one token per UTF-8 byte
    hf = getattr(tokenizer, "tokenizer", tokenizer)
    get_vocab = getattr(hf, "get_vocab", None)
    if callable(get_vocab):
        try:
            vocab = get_vocab()
            return max(8, max((len(k) for k in vocab), default=0))
        except Exception:  # noqa: BLE001 - fall back to a generous constant
            pass
    return _DEFAULT_CHARS_PER_TOKEN


class PromptTokenizer:
    """Turns completion prompts and chat messages into checked token-id lists."""

    def __init__(self, tokenizer: Any, max_model_len: Optional[int], workers: int = 2,
                 chat_template: Optional[str] = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chat_template = chat_template     # --chat-template: in the model's one's place
        self.chars_per_token = max_chars_per_token(tokenizer) if tokenizer is not None \
            else _DEFAULT_CHARS_PER_TOKEN
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="minikernels-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def resolve_truncation(self, truncate: Optional[int]) -> Optional[int]:
        """``truncate_prompt_tokens`` -> the number of tokens to keep (None: all)."""
        if truncate is None:
            return None
        limit = self.max_model_len
        if truncate == -1:
            if not limit:
                raise APIError("truncate_prompt_tokens=-1 needs a known context length",
                               param="truncate_prompt_tokens")
            return limit
        if limit and truncate > limit:
            raise APIError(f"truncate_prompt_tokens ({truncate}) exceeds the maximum context "
                           f"length {limit}", param="truncate_prompt_tokens",
                           code="invalid_value")
        return truncate

    def _char_limit(self) -> Optional[int]:
        return self.max_model_len * self.chars_per_token if self.max_model_len else None

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    async def completion_prompt(self, prompt: Union[str, list[int]], keep: Optional[int],
                                param: str = "prompt") -> list[int]:
        """Token ids of one completions prompt, truncated to its last ``keep`` tokens."""
        if isinstance(prompt, list):
            ids = prompt
        else:
            if self.tokenizer is None:
                raise APIError("this model has no tokenizer: send the prompt as token ids",
                               param=param)
            text = prompt
            if keep is not None:
                # Only the tail can survive truncation; a few spare tokens' worth of text
                # keeps the cut (which may split a word) out of the kept tokens.
                text = text[-(keep + 8) * self.chars_per_token:]
            else:
                limit = self._char_limit()
                if limit is not None and len(text) > limit:
                    raise APIError(f"the prompt ({len(text)} characters) cannot fit the "
                                   f"maximum context length of {self.max_model_len} tokens",
                                   param=param, code="context_length_exceeded")
            ids = await self._off_loop(self._encode, text)
        if keep is not None:
            ids = ids[-keep:]
        return ids

    async def pair_prompt(self, text_1: str, text_2: str, param: str) -> list[int]:
        """Token ids of a (query, document) pair: the tokenizer's pair encoding (a
        cross-encoder's input), off the event loop."""
        if self.tokenizer is None:
            raise APIError("this model has no tokenizer", param=param)
        limit = self._char_limit()
        if limit is not None and len(text_1) + len(text_2) > limit:
            raise APIError(f"the pair ({len(text_1) + len(text_2)} characters) cannot fit "
                           f"the maximum context length of {self.max_model_len} tokens",
                           param=param, code="context_length_exceeded")
        return await self._off_loop(
            lambda: [int(t) for t in self.tokenizer.encode_pair(text_1, text_2)])

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (/tokenize: no context-length check; the body limit bounds
        the work), off the event loop."""
        return await self._off_loop(
            lambda: [int(t) for t in self.tokenizer.encode(
                text, add_special_tokens=add_special_tokens)])

    async def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids`` with special tokens kept (/detokenize), off the event loop."""
        return await self._off_loop(
            lambda: self.tokenizer.decode(ids, skip_special_tokens=False))

    async def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          template_kwargs: Optional[dict[str, Any]],
                          keep: Optional[int],
                          tools: Optional[list[dict[str, Any]]] = None) -> list[int]:
        """Token ids of the rendered chat (with ``tools`` for the template), truncated to
        its last ``keep`` tokens."""
        limit = self._char_limit()
        chars = sum(len(m.get("content") or "") + len(m.get("name") or "")
                    + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
                    for m in messages)
        if tools:
            chars += len(json.dumps(tools))
        if keep is None and limit is not None and chars > limit:
            raise APIError(f"the messages ({chars} characters) cannot fit the maximum "
                           f"context length of {self.max_model_len} tokens",
                           param="messages", code="context_length_exceeded")
        ids = await self._off_loop(render_chat, self.tokenizer, messages,
                                   add_generation_prompt, template_kwargs, tools,
                                   self.chat_template)
        if not ids:
            raise APIError("messages produced an empty prompt", param="messages")
        if keep is not None:
            ids = ids[-keep:]
        return ids

    def max_tokens_for(self, n_prompt: int, wanted: Optional[int], param: str) -> int:
        """``wanted`` (None: the rest of the context) checked against the context length."""
        limit = self.max_model_len
        if wanted is None:
            wanted = (limit - n_prompt) if limit else 256
            if wanted < 1:
                raise APIError(f"the prompt is {n_prompt} tokens; this model's maximum "
                               f"context length is {limit}", param=param,
                               code="context_length_exceeded")
        elif limit and n_prompt + wanted > limit:
            if n_prompt >= limit:
                raise APIError(f"the prompt is {n_prompt} tokens; this model's maximum "
                               f"context length is {limit}", param=param,
                               code="context_length_exceeded")
            raise APIError(f"prompt ({n_prompt} tokens) + max_tokens ({wanted}) exceeds "
                           f"the maximum context length {limit}", param="max_tokens",
                           code="context_length_exceeded")
        return wanted
