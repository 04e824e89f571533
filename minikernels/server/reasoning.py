"""Reasoning parsers: a thinking model's ``<think> ... </think>`` text split from its answer
(``--reasoning-parser``, vLLM's flag and names).

Chat answers carry the thinking in ``message.reasoning_content`` (streamed as
``delta.reasoning_content``) and the rest in ``content``, where tool-call parsing then
runs; the Responses API puts it in a ``reasoning`` output item. ``include_reasoning:
false`` (vLLM's request field) drops it.

Both parsers read ``<think>`` ... ``</think>``:

- ``qwen3``: the output is thinking when it opens with ``<think>`` or when the prompt
  already ends with ``<think>`` (chat templates that open the block for the model:
  Qwen3-2507-Thinking, QwQ); otherwise it is all answer (``enable_thinking: false``).
- ``deepseek_r1``: the output always starts as thinking (R1 and its distills open the
  block in the prompt or right away).

Thinking runs to ``</think>``; newlines right after it are dropped. An output cut off
before ``</think>`` is all thinking. Streaming holds back only a tail that may be the
start of a tag, so every split of the text gives the same two strings as the whole.
"""
from __future__ import annotations

from typing import Optional

from .tool_parsers import _partial_suffix

START, END = "<think>", "</think>"


class ReasoningParser:
    """One output: text in (whole or in deltas), (reasoning, answer) out."""

    def __init__(self, name: str, prompt_opens_thinking: bool = False) -> None:
        if name not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}; choose from "
                             f"{sorted(REASONING_PARSERS)}")
        self.name = name
        thinking = name == "deepseek_r1" or prompt_opens_thinking
        self._state = "reasoning" if thinking else "undecided"
        self._buffer = ""
        self._after_end = False     # just left </think>: drop the newlines that follow
        self._fresh = thinking      # thinking from the start: a <think> may still come
        self.saw_reasoning = thinking

    def split(self, text: str) -> tuple[Optional[str], Optional[str]]:
        """A whole output -> (reasoning or None, answer or None)."""
        reasoning, content = self.feed(text, final=True)
        return (reasoning if self.saw_reasoning else None), (content or None)

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """New output text -> (reasoning to send now, answer to send now)."""
        self._buffer += delta
        reasoning, content = [], []
        while True:
            if self._state == "undecided":
                head = self._buffer.lstrip()
                if head.startswith(START):
                    self._buffer = head[len(START):]
                    self._state = "reasoning"
                    self.saw_reasoning = True
                    continue
                if not final and START.startswith(head):
                    break                       # maybe the start of <think>: wait
                self._state = "content"
                continue
            if self._state == "reasoning":
                if self._fresh:             # an explicit <think> opening the output
                    head = self._buffer.lstrip()
                    if head.startswith(START):
                        self._buffer = head[len(START):]
                    elif not final and START.startswith(head):
                        break
                    self._fresh = False
                end = self._buffer.find(END)
                if end < 0:
                    keep = 0 if final else _partial_suffix(self._buffer, END)
                    reasoning.append(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                reasoning.append(self._buffer[:end])
                self._buffer = self._buffer[end + len(END):]
                self._state = "content"
                self._after_end = True
                continue
            # content
            if self._after_end:
                stripped = self._buffer.lstrip("\r\n")
                if not stripped and not final:
                    self._buffer = ""
                    break
                self._buffer = stripped
                self._after_end = False
            content.append(self._buffer)
            self._buffer = ""
            break
        return "".join(reasoning), "".join(content)


REASONING_PARSERS = ("deepseek_r1", "qwen3")


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """Whether the rendered prompt (its last few tokens' text) leaves a ``<think>`` block
    open for the model."""
    tail = prompt_tail.rstrip()
    return tail.endswith(START)


def prompt_closes_thinking(prompt_tail: str) -> bool:
    """Whether the rendered prompt (its last few tokens' text) ends with a closed
    ``<think> ... </think>`` block for this turn (Qwen3's ``enable_thinking: false``
    renders ``<think>\n\n</think>\n\n``): the model answers at once, so a constraint
    applies from its first token."""
    return prompt_tail.rstrip().endswith(END)


def constraint_start_marker(tokenizer: object) -> list[int]:
    """The token ids of ``</think>``: a structured-output constraint of a reasoning model
    starts after them (``StructuredOutputsParams.start_after``)."""
    return list(tokenizer.encode(END, add_special_tokens=False))
