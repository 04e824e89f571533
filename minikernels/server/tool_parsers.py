"""Tool-call parsers: model output text -> OpenAI ``tool_calls`` (whole and streaming).

One parser per output format, chosen with ``--tool-call-parser`` (vLLM's names):

- ``hermes``: Hermes / Qwen2.5 style, each call ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``; text outside the tags is the message content.
- ``llama3_json``: Llama 3.x JSON tool calls: the output (optionally after
  ``<|python_tag|>``) is ``{"name": ..., "parameters": {...}}``, several separated by ``;``.
- ``mistral`` (``[TOOL_CALLS]``), ``granite`` (``<|tool_call|>``, Granite 3.x),
  ``phi4_mini_json`` (``functools``, Phi-4-mini): text, then the marker and a JSON list of
  ``{"name": ..., "arguments": {...}}`` objects to the end of the output.
- ``pythonic``: Llama 3.2 / Llama 4 style, the output (optionally inside
  ``<|python_start|>`` ... ``<|python_end|>``) is a Python list of calls with keyword
  arguments, ``[get_weather(city="Paris", days=2), get_time()]``; the arguments must be
  literals (read with ``ast.literal_eval``, never evaluated).

Streaming (:meth:`ToolParser.stream`) yields content deltas as they become safe to send and
one tool-call delta per call once its JSON is complete (id, type, name and the whole
arguments string: OpenAI clients accumulate ``arguments`` across deltas, so one delta is a
valid stream). Text that cannot be parsed as a call stays content: nothing is dropped.
"""
from __future__ import annotations

import ast
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

    def _stream_whole_output(self, delta: str, final: bool, opener: str,
                             tag: str) -> tuple[str, list[ToolCall]]:
        """Streaming for formats where the whole output is the calls (or none is), known
        only once it ends: an output that cannot start with ``opener`` or ``tag`` streams
        at once as content; a possible call is held back and parsed when it ends."""
        self._buffer += delta
        head = self._buffer.lstrip()
        maybe_call = head.startswith(opener) or head.startswith(tag) or \
            (not final and (head == "" or tag.startswith(head)))
        if not maybe_call:
            out, self._buffer = self._buffer, ""
            return out, []
        if not final:
            return "", []
        content, calls = self.parse(self._buffer)
        self._buffer = ""
        self.calls.extend(calls)
        return (content or ""), calls


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
        return self._stream_whole_output(delta, final, "{", self.TAG)


class MarkerJsonListToolParser(ToolParser):
    """Content, then ``MARKER`` and a JSON list of calls (or one call object) that runs to
    the end of the output. Streaming sends content until the marker shows up (a tail
    that may be its start is held back), then holds the rest until the output ends."""

    MARKER = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.MARKER)
        if start < 0:
            return (text or None), []
        calls = self._parse_calls(text[start + len(self.MARKER):])
        if calls is None:                 # not a list of calls: all of it is content
            return (text or None), []
        content = text[:start].strip()
        return (content or None), calls

    @staticmethod
    def _parse_calls(body: str) -> list[ToolCall] | None:
        try:
            obj = json.loads(body.strip())
        except ValueError:
            return None
        items = obj if isinstance(obj, list) else [obj]
        calls = [_call_from_json(o, ("arguments", "parameters")) for o in items]
        if not calls or any(c is None for c in calls):
            return None
        return calls  # type: ignore[return-value]

    def stream(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buffer += delta
        start = self._buffer.find(self.MARKER)
        if start < 0:
            keep = 0 if final else _partial_suffix(self._buffer, self.MARKER)
            out = self._buffer[:len(self._buffer) - keep]
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return out, []
        out, self._buffer = self._buffer[:start], self._buffer[start:]
        if not final:
            return out, []
        calls = self._parse_calls(self._buffer[len(self.MARKER):])
        rest, self._buffer = self._buffer, ""
        if calls is None:
            return out + rest, []
        self.calls.extend(calls)
        return out, calls


class MistralToolParser(MarkerJsonListToolParser):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"


class GraniteToolParser(MarkerJsonListToolParser):
    name = "granite"
    MARKER = "<|tool_call|>"


class Phi4MiniJsonToolParser(MarkerJsonListToolParser):
    name = "phi4_mini_json"
    MARKER = "functools"


class PythonicToolParser(ToolParser):
    """``[f(a=1, b="x"), g()]`` (see the module docstring)."""

    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"

    def _body(self, text: str) -> str:
        body = text.strip()
        if body.startswith(self.START):
            body = body[len(self.START):]
            if body.rstrip().endswith(self.END):
                body = body.rstrip()[:-len(self.END)]
        return body.strip()

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if not body.startswith("["):
            return (text or None), []
        try:
            tree = ast.parse(body, mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return (text or None), []
        if not isinstance(tree, ast.List) or not tree.elts:
            return (text or None), []
        calls = []
        for node in tree.elts:
            call = self._call(node)
            if call is None:
                return (text or None), []
            calls.append(call)
        return None, calls

    @staticmethod
    def _call(node: ast.expr) -> ToolCall | None:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:            # **kwargs
                return None
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        try:
            text = json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError):   # sets, bytes, complex: not JSON arguments
            return None
        return ToolCall(node.func.id, text)

    def stream(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        return self._stream_whole_output(delta, final, "[", self.START)


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (
    HermesToolParser, Llama3JsonToolParser, MistralToolParser, GraniteToolParser,
    Phi4MiniJsonToolParser, PythonicToolParser)}


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
