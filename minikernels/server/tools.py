"""Chat tool calling: how a request's output becomes ``content`` and ``tool_calls``.

:class:`ToolMode` is chosen per request from ``tools`` / ``tool_choice``:

- no tools, or ``tool_choice: "none"``: the output is content;
- ``"auto"`` (the default with tools): the server's ``--tool-call-parser``
  (:mod:`.tool_parsers`) splits content from calls; without a parser "auto" is refused;
- ``"required"`` / a named function: the output was constrained to the calls' JSON
  (:func:`.structured.forced_tool_constraint`) and is read back with
  :func:`.structured.calls_from_forced_output` (an output cut by ``max_tokens`` that does
  not parse stays content).

``finish_reason`` is ``"tool_calls"`` when the output holds calls and stopped normally.
``parallel_tool_calls: false`` keeps only the first call.

:class:`ToolStream` does the same incrementally for streaming, as OpenAI sends it: the
first delta of each call carries ``index``, ``id``, ``type``, ``function.name`` and
``function.arguments`` (a named function's arguments then continue in further deltas of
the same index); content that may still turn out to be a call is held back.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from .errors import APIError
from .structured import calls_from_forced_output
from .tool_parsers import ToolCall, get_parser, new_call_id


class ToolMode:
    """How one chat request's output becomes content and tool calls (see the module)."""

    def __init__(self, kind: str, parser: Optional[str] = None,
                 tool_name: Optional[str] = None, parallel: bool = True) -> None:
        self.kind = kind            # "none" | "auto" | "forced"
        self.parser = parser
        self.tool_name = tool_name  # forced: the named function (None = "required")
        self.parallel = parallel

    @classmethod
    def of(cls, req: Any, parser: Optional[str]) -> "ToolMode":
        """The mode of a validated ChatCompletionRequest on a server with ``parser``."""
        choice = req.effective_tool_choice
        parallel = req.parallel_tool_calls is not False
        if not req.tools or choice == "none":
            return cls("none")
        if choice == "auto":
            if parser is None:
                raise APIError('tool_choice "auto" needs a tool-call parser and this server '
                               'was started without --tool-call-parser (use "required", a '
                               'named function, or "none")', param="tool_choice",
                               code="invalid_value")
            return cls("auto", parser=parser, parallel=parallel)
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        return cls("forced", tool_name=name, parallel=parallel)

    def split(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """A whole output -> (content, or None when there are only calls; the calls)."""
        if self.kind == "none":
            return text, []
        if self.kind == "forced":
            calls = calls_from_forced_output(text, self.tool_name)
            content: Optional[str] = None if calls else text
        else:
            content, calls = get_parser(self.parser or "").parse(text)
            if content is None and not calls:
                content = text
        if not self.parallel:
            calls = calls[:1]
        return content, calls

    @staticmethod
    def finish_reason(reason: Optional[str], has_calls: bool) -> Optional[str]:
        return "tool_calls" if has_calls and reason == "stop" else reason

    def stream(self) -> "ToolStream":
        return ToolStream(self)


class ToolStream:
    """One streamed choice: output text deltas in, (content delta, tool-call deltas) out."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.parser = get_parser(mode.parser) if mode.kind == "auto" else None
        self.num_calls = 0          # calls started (their delta indexes are 0..n-1)
        self._pending_ws = ""       # auto: whitespace between calls, sent only if content
        self._buffer = ""           # forced: output text not yet turned into deltas
        self._pos = 0               # forced "required": parse position in _buffer
        self._named_id: Optional[str] = None

    @property
    def has_calls(self) -> bool:
        return self.num_calls > 0

    def feed(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """New output text -> (content to send now, tool-call deltas to send now)."""
        kind = self.mode.kind
        if kind == "none":
            return delta, []
        if kind == "auto":
            return self._feed_auto(delta, final)
        if self.mode.tool_name is not None:
            return self._feed_named(delta, final)
        return self._feed_required(delta, final)

    # ------------------------------------------------------------------ modes
    def _start_call(self, call: ToolCall) -> Optional[dict[str, Any]]:
        if self.num_calls and not self.mode.parallel:
            return None
        d = {"index": self.num_calls, "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
        self.num_calls += 1
        return d

    def _feed_auto(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        assert self.parser is not None
        content, calls = self.parser.stream(delta, final)
        deltas = [d for d in map(self._start_call, calls) if d is not None]
        # Whitespace before a call is not content (the whole-output parse strips it): a
        # trailing run of whitespace waits until more content follows, whatever the
        # chunking, and goes out at the end only when no call came.
        text = self._pending_ws + content
        if final and not self.has_calls:
            self._pending_ws = ""
            return text, deltas
        body = text.rstrip()
        self._pending_ws = text[len(body):]
        return body, deltas

    def _feed_named(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        # The output is the named function's arguments object: stream it as the arguments.
        if not delta:
            return "", []
        if self._named_id is None:
            self._named_id = new_call_id()
            self.num_calls = 1
            return "", [{"index": 0, "id": self._named_id, "type": "function",
                         "function": {"name": self.mode.tool_name, "arguments": delta}}]
        return "", [{"index": 0, "function": {"arguments": delta}}]

    def _feed_required(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        # The output is a JSON array of {"name", "parameters"}: one call per complete item.
        self._buffer += delta
        deltas: list[dict[str, Any]] = []
        buf = self._buffer
        if self._pos == 0:
            start = buf.find("[")
            if start < 0:
                return self._required_tail(final, deltas)
            self._pos = start + 1
        decoder = json.JSONDecoder()
        while True:
            pos = self._pos
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf) or buf[pos] == "]":
                break
            try:
                item, end = decoder.raw_decode(buf, pos)
            except ValueError:
                break
            self._pos = end
            calls = calls_from_forced_output(json.dumps([item]), None)
            deltas += [d for d in map(self._start_call, calls) if d is not None]
        return self._required_tail(final, deltas)

    def _required_tail(self, final: bool, deltas: list[dict[str, Any]]
                       ) -> tuple[str, list[dict[str, Any]]]:
        # An output that never made a call (cut by max_tokens) is content, as unstreamed.
        if final and not self.has_calls:
            return self._buffer, deltas
        return "", deltas
