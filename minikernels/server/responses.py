"""OpenAI's Responses API (``POST /v1/responses``) on the chat pipeline.

A Responses request is turned into the equivalent chat request (:meth:`ResponsesRequest.
to_chat`): ``instructions`` become a system message; ``input`` (a string, or a list of
items) becomes the messages (user / system / developer / assistant messages with text
content, ``function_call`` items as assistant ``tool_calls``, ``function_call_output``
items as ``tool`` messages; a previous response's ``output`` items can be sent back as
they came); function ``tools`` and ``tool_choice`` take chat's shape; ``text.format``
(``json_object`` / ``json_schema``) becomes ``response_format``; ``max_output_tokens``
the token cap. Errors name the Responses field (``input[2].content[0].type``,
``tools[0].parameters``, ``text.format.schema``).

The answer is a ``response`` object whose ``output`` holds a ``message`` item (one
``output_text`` part) and a ``function_call`` item per tool call; ``status`` is
``"completed"``, ``"incomplete"`` (``incomplete_details.reason: "max_output_tokens"``) or
``"cancelled"`` (the server aborted it while shutting down; ``error.code``
``"server_error"``, streamed as ``response.failed``). With ``--reasoning-parser`` a
``reasoning`` item (its ``reasoning_text``; streamed as ``response.reasoning_text.delta``
events) comes first. Streaming sends OpenAI's
typed events (:class:`ResponseEvents`): ``response.created``, ``response.in_progress``,
per item ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` ... ``.done``, ``response.content_part.done``,
``response.function_call_arguments.delta`` / ``.done``, ``response.output_item.done``,
then ``response.completed`` / ``response.incomplete`` (or ``error`` +
``response.failed``), each with its ``sequence_number``.

Stored responses (:mod:`.response_store`, off unless ``--responses-store-size``):
``previous_response_id`` continues a stored conversation (its input and output, not its
instructions); ``store: false`` keeps a response out; without a store
``previous_response_id`` is a 400 and ``store`` is answered ``false``.

``include: ["message.output_text.logprobs"]`` (with ``top_logprobs``) puts each token's
logprob in the ``output_text`` part and in every ``output_text.delta`` event.

Not served (a 400 naming the field): ``background``, ``truncation: "auto"``, other
``include`` values, non-function tools, image / file inputs.
"""
from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, Literal, Optional, Union

from pydantic import Field, StrictInt, ValidationError

from .errors import APIError, unsupported
from .protocol import MAX_TOP_LOGPROBS, ChatCompletionRequest, _Strict, validation_to_api_error
from .tool_parsers import ToolCall

_TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
#: the ``include`` values served
INCLUDABLE = (LOGPROBS_INCLUDE,)
_MESSAGE_ROLES = ("user", "system", "developer", "assistant")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class ResponsesRequest(_Strict):
    """The fields of OpenAI's ``responses.create`` this server honours (strict types,
    unknown fields refused), plus vLLM's sampling extras."""

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    previous_response_id: Optional[str] = None
    background: Optional[bool] = None
    truncation: Optional[Literal["disabled", "auto"]] = None
    reasoning: Optional[dict[str, Any]] = None
    include: Optional[list[str]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM extensions (extra_body)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10.0)
    seed: Optional[int] = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    priority: int = Field(0, ge=-(2 ** 63), lt=2 ** 63)
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=1024)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None   # vLLM's (json / regex / ...)

    def check(self) -> None:
        if self.background:
            raise unsupported("background", "background responses are not supported")
        if self.truncation == "auto":
            raise unsupported("truncation", 'truncation "auto" is not supported (the '
                              'request fails if the input does not fit, as "disabled")')
        for i, item in enumerate(self.include or []):
            if item not in INCLUDABLE:
                raise unsupported(f"include[{i}]", f"include {item!r} is not supported "
                                  f"(supported: {', '.join(INCLUDABLE)})")
        if self.top_logprobs is not None and not self.wants_logprobs:
            raise APIError('top_logprobs needs include ["message.output_text.logprobs"]',
                           param="top_logprobs", code="invalid_value")
        if isinstance(self.input, list) and not self.input:
            raise APIError("input must not be empty", param="input")
        self.to_chat()

    # ------------------------------------------------------------------ to chat
    def to_chat(self, prior: Optional[list[dict[str, Any]]] = None) -> ChatCompletionRequest:
        """The equivalent chat request, checked; errors name the Responses fields.
        ``prior``: the stored conversation ``previous_response_id`` continues (chat
        messages), placed after this request's instructions."""
        messages, where = self._messages(prior or [])
        body: dict[str, Any] = {
            "model": self.model, "messages": messages,
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
            "tools": self._chat_tools(), "tool_choice": self._chat_tool_choice(),
            "parallel_tool_calls": self.parallel_tool_calls if self.tools else None,
            "response_format": self._response_format(), "user": self.user,
            "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "seed": self.seed,
            "priority": self.priority, "cache_salt": self.cache_salt,
            "chat_template_kwargs": self.chat_template_kwargs,
            "structured_outputs": self.structured_outputs,
            "logprobs": self.wants_logprobs,
            "top_logprobs": self.top_logprobs if self.wants_logprobs else None}
        try:
            req = ChatCompletionRequest.model_validate(body)
            req.check()
        except ValidationError as exc:
            raise _renamed(validation_to_api_error(exc), where) from None
        except APIError as exc:
            raise _renamed(exc, where) from None
        return req

    @property
    def wants_logprobs(self) -> bool:
        """include "message.output_text.logprobs": each output_text part carries its
        tokens' logprobs (and ``top_logprobs`` alternatives)."""
        return LOGPROBS_INCLUDE in (self.include or [])

    def input_messages(self, prior: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation so far without the instructions (what a stored response
        keeps): ``prior`` and this request's input, as chat messages."""
        messages, where = self._messages(prior)
        return [m for m, w in zip(messages, where) if w != "instructions"]

    def _messages(self, prior: list[dict[str, Any]]
                  ) -> tuple[list[dict[str, Any]], list[str]]:
        """(chat messages, the Responses field each message came from)."""
        messages: list[dict[str, Any]] = []
        where: list[str] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
            where.append("instructions")
        for m in prior:
            messages.append(dict(m))
            where.append("previous_response_id")
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            where.append("input")
            return messages, where
        for i, item in enumerate(self.input):
            param = f"input[{i}]"
            kind = item.get("type", "message")
            if kind == "message":
                _check_keys(item, param, {"type", "role", "content", "id", "status"})
                role = item.get("role")
                if role not in _MESSAGE_ROLES:
                    raise APIError(f"{param}.role must be one of {list(_MESSAGE_ROLES)}",
                                   param=f"{param}.role", code="invalid_value")
                messages.append({"role": role, "content": _text(item.get("content"),
                                                                f"{param}.content")})
                where.append(param)
            elif kind == "function_call":
                _check_keys(item, param, {"type", "call_id", "name", "arguments", "id",
                                          "status"})
                for key in ("call_id", "name", "arguments"):
                    if not isinstance(item.get(key), str):
                        raise APIError(f"{param}.{key} must be a string",
                                       param=f"{param}.{key}")
                call = {"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and \
                        where[-1].startswith("input[") and "tool_calls" in last:
                    last["tool_calls"].append(call)       # parallel calls: one message
                    continue
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                where.append(param)
            elif kind == "function_call_output":
                _check_keys(item, param, {"type", "call_id", "output", "id", "status"})
                if not isinstance(item.get("call_id"), str):
                    raise APIError(f"{param}.call_id must be a string",
                                   param=f"{param}.call_id")
                messages.append({"role": "tool", "tool_call_id": item["call_id"],
                                 "content": _text(item.get("output"), f"{param}.output")})
                where.append(param)
            elif kind == "reasoning":
                continue      # another model's reasoning: not part of this prompt
            else:
                raise unsupported(f"{param}.type", f"input item type {kind!r} is not "
                                  "supported (message, function_call, function_call_output)")
        if not messages:
            raise APIError("input holds no message", param="input")
        return messages, where

    def _chat_tools(self) -> Optional[list[dict[str, Any]]]:
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "function":
                raise unsupported(f"tools[{i}].type", f"tool type {tool.get('type')!r} is "
                                  "not supported (function tools only)")
            _check_keys(tool, f"tools[{i}]", {"type", "name", "description", "parameters",
                                              "strict"})
            out.append({"type": "function",
                        "function": {k: v for k, v in tool.items() if k != "type"}})
        return out

    def _chat_tool_choice(self) -> Any:
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or set(choice) != {"type", "name"} or \
                    not isinstance(choice.get("name"), str):
                raise APIError('tool_choice must be "none", "auto", "required" or '
                               '{"type": "function", "name": ...}', param="tool_choice",
                               code="invalid_value")
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def _response_format(self) -> Optional[dict[str, Any]]:
        if self.text is None:
            return None
        _check_keys(self.text, "text", {"format", "verbosity"})
        fmt = self.text.get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise APIError("text.format must be an object with a 'type' of 'text', "
                           "'json_object' or 'json_schema'", param="text.format")
        if fmt["type"] != "json_schema":
            _check_keys(fmt, "text.format", {"type"})
            return {"type": fmt["type"]}
        _check_keys(fmt, "text.format", {"type", "name", "schema", "strict", "description"})
        return {"type": "json_schema",
                "json_schema": {k: v for k, v in fmt.items() if k != "type"}}

    # ------------------------------------------------------------------ echo
    def echo_fields(self, temperature: float, top_p: float, stored: bool = False
                    ) -> dict[str, Any]:
        """The request fields a response object repeats (effective sampling values;
        ``store``: whether this server keeps the response)."""
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id, "reasoning": self.reasoning,
            "store": stored,
            "temperature": temperature, "top_p": top_p,
            "text": self.text if self.text and self.text.get("format") else
            {"format": {"type": "text"}},
            "tool_choice": self.tool_choice if self.tool_choice is not None else
            ("auto" if self.tools else "none"),
            "tools": self.tools or [], "truncation": "disabled", "user": self.user,
            "metadata": self.metadata or {}, "top_logprobs": self.top_logprobs}


def assistant_message(content: Optional[str], calls: list[ToolCall]) -> dict[str, Any]:
    """A response's output as the chat message a continuation renders."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
    return message


def _check_keys(obj: Any, param: str, allowed: set[str]) -> None:
    if not isinstance(obj, dict):
        raise APIError(f"{param} must be an object", param=param)
    extra = sorted(set(obj) - allowed)
    if extra:
        raise APIError(f"Unrecognized request argument supplied: {param}.{extra[0]}",
                       param=f"{param}.{extra[0]}", code="unknown_parameter")


def _text(content: Any, param: str) -> str:
    """Message content (a string or a list of text parts) as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{param} must be a string or a list of content parts", param=param)
    parts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise unsupported(f"{where}.type", f"content part of type {kind!r} is not "
                              f"supported (text only: {', '.join(_TEXT_PARTS[:2])})")
        _check_keys(part, where, {"type", "text", "annotations", "logprobs"})
        if not isinstance(part.get("text"), str):
            raise APIError(f"{where}.text must be a string", param=f"{where}.text")
        parts.append(part["text"])
    return "".join(parts)


_RENAMES = ((re.compile(r"^tools\[(\d+)\]\.function\."), r"tools[\1]."),
            (re.compile(r"^response_format\.json_schema\."), "text.format."),
            (re.compile(r"^response_format"), "text.format"),
            (re.compile(r"^max_completion_tokens"), "max_output_tokens"))


def _renamed(exc: APIError, where: list[str]) -> APIError:
    """A chat-side error with the Responses field names (messages[i] -> its input item)."""
    param = exc.param
    if not param:
        return exc
    new = param
    m = re.match(r"^messages\[(\d+)\]", param)
    if m and int(m.group(1)) < len(where):
        new = where[int(m.group(1))] + param[m.end():]
    for pattern, repl in _RENAMES:
        new = pattern.sub(repl, new)
    if new == param:
        return exc
    exc.message = exc.message.replace(param, new)
    exc.param = new
    return exc


def as_responses_error(exc: APIError) -> APIError:
    """An error of the shared chat pipeline (prompt rendering, context length, constraint
    compilation) with the Responses field names: ``messages`` -> ``input``,
    ``max_tokens`` -> ``max_output_tokens``, ``response_format`` -> ``text.format``."""
    if exc.param in ("messages", "max_tokens"):
        exc.message = re.sub(r"\bmax_tokens\b", "max_output_tokens", exc.message)
        exc.param = "input" if exc.param == "messages" else "max_output_tokens"
        return exc
    return _renamed(exc, [])


# --------------------------------------------------------------------------- output
def usage_of(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage -> the Responses API's usage object. ``cached_tokens``: prompt tokens
    served by the prefix cache; ``cache_write_tokens`` (OpenAI's billed cache writes) is
    0: the prefix cache keeps blocks as a side effect of running them."""
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {
                "cached_tokens": chat_usage.get("prompt_tokens_details", {}).get(
                    "cached_tokens", 0),
                "cache_write_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def status_of(finish_reason: Optional[str]) -> tuple[str, Optional[dict[str, str]]]:
    """(response status, incomplete_details) for the engine's finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "abort":
        return "cancelled", None
    return "completed", None


def error_of(status: str) -> Optional[dict[str, str]]:
    """The response's ``error`` for a status: only a cancelled response has one (the
    server aborted it while shutting down)."""
    if status != "cancelled":
        return None
    return {"code": "server_error",
            "message": "the server stopped this response while shutting down"}


def message_item(item_id: str, text: str, status: str,
                 logprobs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [text_part(text, logprobs)]}


def text_part(text: str, logprobs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """An ``output_text`` part; ``logprobs``: one entry per token (chat's shape)."""
    return {"type": "output_text", "text": text, "annotations": [],
            "logprobs": list(logprobs or [])}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A thinking model's ``<think>`` text (``--reasoning-parser``) as a reasoning item."""
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def output_items(content: Optional[str], calls: list[ToolCall], status: str,
                 logprobs: Optional[list[dict[str, Any]]] = None,
                 reasoning: Optional[str] = None) -> list[dict[str, Any]]:
    """A finished output: the reasoning (with a reasoning parser), the message (when it
    has content, or nothing else came) and one function_call item per call."""
    item_status = "incomplete" if status == "incomplete" else "completed"
    items = []
    if reasoning is not None:
        items.append(reasoning_item(new_id("rs"), reasoning,
                                    item_status if content is None and not calls
                                    else "completed"))
    if content or not (calls or reasoning is not None):
        items.append(message_item(new_id("msg"), content or "", item_status, logprobs))
    items += [call_item(new_id("fc"), c.id, c.name, c.arguments, "completed") for c in calls]
    return items


def response_object(rid: str, created: int, model: str, echo: dict[str, Any],
                    status: str, output: list[dict[str, Any]],
                    usage: Optional[dict[str, Any]],
                    incomplete: Optional[dict[str, str]] = None,
                    error: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "error": error, "incomplete_details": incomplete, "model": model,
            "output": output, "usage": usage, **echo}


class ResponseEvents:
    """One streamed response: output text / tool-call deltas in, OpenAI's typed events
    out (dicts with ``type`` and ``sequence_number``), opening and closing the message
    item and one function_call item per call as they come."""

    def __init__(self, rid: str, created: int, model: str, echo: dict[str, Any]) -> None:
        self.rid, self.created, self.model, self.echo = rid, created, model, echo
        self.seq = 0
        self.output: list[dict[str, Any]] = []   # items as they stand
        self._open: Optional[dict[str, Any]] = None
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call delta index -> its item

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def snapshot(self, status: str, usage: Optional[dict[str, Any]] = None,
                 incomplete: Optional[dict[str, str]] = None,
                 error: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return response_object(self.rid, self.created, self.model, self.echo, status,
                               [_deep(i) for i in self.output], usage, incomplete, error)

    def start(self) -> list[dict[str, Any]]:
        r = self.snapshot("in_progress")
        return [self._event("response.created", response=r),
                self._event("response.in_progress", response=r)]

    def _add_item(self, item: dict[str, Any]) -> dict[str, Any]:
        self.output.append(item)
        self._open = item
        return self._event("response.output_item.added", output_index=len(self.output) - 1,
                           item=_deep(item))

    def _close_open(self, status: str) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = self.output.index(item)
        events = []
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            base = dict(item_id=item["id"], output_index=index, content_index=0)
            events += [self._event("response.reasoning_text.done", text=text, **base),
                       self._event("response.content_part.done",
                                   part={"type": "reasoning_text", "text": text}, **base)]
            item["status"] = "incomplete" if status == "incomplete" else "completed"
        elif item["type"] == "message":
            text = item["content"][0]["text"] if item["content"] else ""
            base = dict(item_id=item["id"], output_index=index, content_index=0)
            lps = item["content"][0]["logprobs"] if item["content"] else []
            events += [self._event("response.output_text.done", text=text,
                                   logprobs=list(lps), **base),
                       self._event("response.content_part.done",
                                   part=text_part(text, lps), **base)]
            item["status"] = "incomplete" if status == "incomplete" else "completed"
        else:
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=index,
                                      name=item["name"], arguments=item["arguments"]))
            item["status"] = "completed"
        events.append(self._event("response.output_item.done", output_index=index,
                                  item=_deep(item)))
        return events

    def feed_reasoning(self, text: str) -> list[dict[str, Any]]:
        """Events for new thinking text: a reasoning item opened on the first."""
        if not text:
            return []
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != "reasoning":
            events += self._close_open("completed")
            item = reasoning_item(new_id("rs"), "", "in_progress")
            item["content"] = []
            events.append(self._add_item(item))
            item["content"].append({"type": "reasoning_text", "text": ""})
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=len(self.output) - 1, content_index=0,
                                      part={"type": "reasoning_text", "text": ""}))
        item = self._open
        assert item is not None
        item["content"][0]["text"] += text
        events.append(self._event("response.reasoning_text.delta", item_id=item["id"],
                                  output_index=self.output.index(item), content_index=0,
                                  delta=text))
        return events

    def feed(self, content: str, call_deltas: list[dict[str, Any]],
             logprobs: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
        """Events for new content text (and its tokens' ``logprobs``) and chat-shaped
        tool-call deltas."""
        events: list[dict[str, Any]] = []
        if content:
            if self._open is None or self._open["type"] != "message":
                events += self._close_open("completed")
                item = message_item(new_id("msg"), "", "in_progress")
                item["content"] = []
                events.append(self._add_item(item))
                item["content"].append(text_part(""))
                events.append(self._event("response.content_part.added",
                                          item_id=item["id"],
                                          output_index=len(self.output) - 1,
                                          content_index=0, part=text_part("")))
            item = self._open
            assert item is not None
            item["content"][0]["text"] += content
            item["content"][0]["logprobs"] += logprobs or []
            events.append(self._event("response.output_text.delta", item_id=item["id"],
                                      output_index=self.output.index(item),
                                      content_index=0, delta=content,
                                      logprobs=list(logprobs or [])))
        for d in call_deltas:
            fn = d.get("function", {})
            item = self._calls.get(d["index"])
            if item is None:         # a new call: its first delta names it
                events += self._close_open("completed")
                item = call_item(new_id("fc"), d["id"], fn.get("name", ""), "",
                                 "in_progress")
                self._calls[d["index"]] = item
                events.append(self._add_item(item))
            args = fn.get("arguments") or ""
            if args:
                item["arguments"] += args
                events.append(self._event("response.function_call_arguments.delta",
                                          item_id=item["id"],
                                          output_index=self.output.index(item), delta=args))
        return events

    def finish(self, finish_reason: Optional[str], usage: dict[str, Any]
               ) -> list[dict[str, Any]]:
        """Close what is open, then ``response.completed`` / ``.incomplete``."""
        status, incomplete = status_of(finish_reason)
        events = self._close_open(status)
        if not self.output:       # nothing was generated: an empty message, as unstreamed
            item = message_item(new_id("msg"), "", "in_progress")
            item["content"] = []
            events.append(self._add_item(item))
            item["content"].append(text_part(""))
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=0, content_index=0, part=text_part("")))
            events += self._close_open(status)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete",
                "cancelled": "response.failed"}[status]
        return events + [self._event(kind, response=self.snapshot(
            status, usage_of(usage), incomplete, error_of(status)))]

    def fail(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """An engine error after the stream began: ``error``, then ``response.failed``."""
        return [self._event("error", code=error.get("code"), message=error.get("message"),
                            param=error.get("param")),
                self._event("response.failed", response=self.snapshot(
                    "failed", error={"code": "server_error",
                                     "message": error.get("message", "")}))]


def _deep(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


def sse_event(event: dict[str, Any]) -> str:
    """One server-sent event as OpenAI sends the Responses API's: ``event:`` + ``data:``."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n"


def created_now() -> int:
    return int(time.time())
