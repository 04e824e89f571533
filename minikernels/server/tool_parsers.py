"""Tool-call parsers: model output text -> OpenAI ``tool_calls`` (whole and streaming).

One parser per output format, chosen with ``--tool-call-parser`` (vLLM's names):

- ``hermes``: Hermes / Qwen2.5 style, each call ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``; text outside the tags is the message content.
- ``llama3_json``: Llama 3.x JSON tool calls: the output (optionally after
  ``<|python_tag|>``) is ``{"name": ..., "parameters": {...}}``, several separated by ``;``.

Streaming (:meth:`ToolParser.stream`) yields content deltas as they become safe to send and
one tool-call delta per call once its JSON is complete (id, type, name and the whole
arguments string: OpenAI clients accumulate ``arguments`` across deltas, so one delta is a
valid stream). Text that cannot be parsed as a call stays content: nothing is dropped.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: str                 # JSON text of the arguments object
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _call_from_json(obj: Any, args_key: tuple[str, ...]) -> ToolCall | None:
    """{"name": str, <args_key>: object} -> ToolCall; anything else -> None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = {}
    for key in args_key:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):          # some models emit the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """Base: ``parse`` a whole output; ``stream`` one delta of text at a time."""

    name = ""

    def __init__(self) -> None:
        self._buffer = ""
        self.calls: list[ToolCall] = []

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        raise NotImplementedError

    def stream(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """Feed output text; returns (content safe to send now, calls completed now)."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls = [], []
        rest = text
        while True:
            start = rest.find(self.OPEN)
            if start < 0:
                content.append(rest)
                break
            end = rest.find(self.CLOSE, start)
            if end < 0:                       # unterminated: keep as content
                content.append(rest)
                break
            body = rest[start + len(self.OPEN):end]
            call = self._parse_body(body)
            if call is None:
                content.append(rest[:end + len(self.CLOSE)])
            else:
                content.append(rest[:start])
                calls.append(call)
            rest = rest[end + len(self.CLOSE):]
        text_out = "".join(content)
        if calls:
            text_out = text_out.strip()
        return (text_out or None), calls

    @staticmethod
    def _parse_body(body: str) -> ToolCall | None:
        try:
            obj = json.loads(body.strip())
        except ValueError:
            return None
        return _call_from_json(obj, ("arguments", "parameters"))

    def stream(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buffer += delta
        out, done = [], []
        while True:
            start = self._buffer.find(self.OPEN)
            if start < 0:
                # hold back a tail that may be the start of "<tool_call>"
                keep = 0 if final else _partial_suffix(self._buffer, self.OPEN)
                out.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            out.append(self._buffer[:start])
            end = self._buffer.find(self.CLOSE, start)
            if end < 0:
                self._buffer = self._buffer[start:]
                if final:                      # never closed: it was content after all
                    out.append(self._buffer)
                    self._buffer = ""
                break
            body = self._buffer[start + len(self.OPEN):end]
            call = self._parse_body(body)
            if call is None:
                out.append(self._buffer[start:end + len(self.CLOSE)])
            else:
                done.append(call)
                self.calls.append(call)
            self._buffer = self._buffer[end + len(self.CLOSE):]
        return "".join(out), done


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].strip()
        if not body.startswith("{"):
            return (text or None), []
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return (text or None), []
            call = _call_from_json(obj, ("parameters", "arguments"))
            if call is None:
                return (text or None), []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return None, calls

    def stream(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        # A JSON tool call is only known once the output ends: content that does not look
        # like a call streams at once, a possible call is held back until final.
        self._buffer += delta
        head = self._buffer.lstrip()
        maybe_call = head.startswith("{") or head.startswith(self.TAG) or \
            (not final and (self.TAG.startswith(head) or head == ""))
        if not maybe_call:
            out, self._buffer = self._buffer, ""
            return out, []
        if not final:
            return "", []
        content, calls = self.parse(self._buffer)
        self._buffer = ""
        self.calls.extend(calls)
        return (content or ""), calls


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesToolParser,
                                                            Llama3JsonToolParser)}


def get_parser(name: str) -> ToolParser:
    """A fresh parser by its --tool-call-parser name."""
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from "
                         f"{sorted(PARSERS)}") from None


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of token."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:n]):
            return n
    return 0
