"""OpenAI request bodies (the subset we serve) and their validation.

Bodies are decoded by :mod:`.jsonbody`, then validated by the pydantic models below in
**strict** mode, like OpenAI's API: ``"max_tokens": "4"``, ``"stream": "true"``,
``"n": true`` and ``"max_tokens": 4.0`` are refused, not coerced. ``null`` for an
optional field means its default. Every field is either honoured or refused with a 400
naming it; an unknown field is refused (``Unrecognized request argument supplied``), never
silently dropped.

Field names and ranges follow OpenAI's API; vLLM's extra fields are accepted where the
server or engine honours them (``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, ``min_tokens``, ``include_stop_str_in_output``,
``skip_special_tokens``, ``truncate_prompt_tokens``, ``chat_template_kwargs``,
``add_generation_prompt``, chat ``echo``, ``priority``, ``cache_salt``; completions
``echo`` with ``logprobs`` returns the prompt tokens' logprobs), and refused with a 400
where the engine has no support (``cache_salt`` on an engine without salted prefix
caching).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, ValidationError,
                      field_validator, model_validator)

from .errors import APIError, unsupported
from .jsonbody import format_path

MAX_N = 64            # choices per request (each one is an engine sample)
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16

# chat_template_kwargs may not override what the server itself passes to the template.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "add_generation_prompt", "tokenize", "tools", "documents",
    "chat_template", "return_dict", "continue_final_message", "return_tensors", "padding",
    "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
    "sanitize_control_tokens"})

_UNION_LABELS = ("str", "int", "bool", "float")


def validation_to_api_error(exc: ValidationError) -> APIError:
    """First pydantic error -> 400 naming the offending field (``param``)."""
    err = exc.errors()[0]
    loc = tuple(p for p in err.get("loc", ())
                if not (isinstance(p, str) and (p in _UNION_LABELS or p.startswith(
                    ("list[", "function-", "dict[", "literal[", "nullable[")))))
    param = format_path(loc) or None
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return APIError(f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    msg = err.get("msg", "invalid value")
    if kind in ("int_type", "bool_type", "float_type", "string_type", "list_type",
                "dict_type", "model_type", "int_from_float"):
        got = type(err.get("input")).__name__
        got = {"str": "a string", "bool": "a boolean", "float": "a number", "int": "an "
               "integer", "list": "an array", "dict": "an object"}.get(got, got)
        msg = f"{msg} (got {got}; JSON types are not coerced)"
    return APIError(f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


class _Strict(BaseModel):
    """Strict JSON types, unknown fields refused, ``null`` = the field's default."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None          # OpenAI's end-user id: no effect on the output
    # vLLM extensions (sent by the openai client via extra_body)
    top_k: Optional[int] = Field(None, ge=-1)   # -1 or 0 = off
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    # Below 0.01 the fp32 logits / penalty overflow and the probabilities become NaN.
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[StrictInt]] = None
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)
    priority: int = Field(0, ge=-(2 ** 63), lt=2 ** 63)   # lower runs first (vLLM's)
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=1024)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else list(v)
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return items or None

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _check_truncate(cls, v: Optional[int]) -> Optional[int]:
        if v == 0:
            raise ValueError("must be -1 (the model's context length) or >= 1")
        return v

    def check_common(self) -> None:
        """Cross-field checks pydantic field validators cannot express."""
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true",
                           param="stream_options")
        if self.logit_bias:
            raise unsupported("logit_bias")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise APIError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                           f"({self.max_tokens})", param="min_tokens", code="invalid_value")


# Strict ints: JSON true/false or 1.0 are not token ids.
PromptType = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise unsupported("suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "best_of != n is not supported")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt field as a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            out: list = [p]
        elif len(p) == 0:
            raise APIError("prompt must not be empty", param="prompt")
        elif all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        for x in out:
            if len(x) == 0:
                raise APIError("prompt must not be empty", param="prompt")
            if isinstance(x, list) and any(t < 0 for t in x):
                raise APIError("token ids must be >= 0", param="prompt")
        return out


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[Any]] = None
    tool_call_id: Optional[str] = None

    def text(self, param: str) -> str:
        """Content as plain text; multi-part content must be all text parts."""
        c = self.content
        if c is None:
            return ""
        if isinstance(c, str):
            return c
        parts = []
        for j, part in enumerate(c):
            kind = part.get("type")
            if kind != "text":
                raise unsupported(f"{param}.content[{j}].type",
                                  f"content part of type {kind!r} is not supported (text "
                                  "only)")
            if not isinstance(part.get("text"), str):
                raise APIError("a text content part needs a string 'text' field",
                               param=f"{param}.content[{j}].text")
            extra = sorted(set(part) - {"type", "text"})
            if extra:
                raise APIError(f"Unrecognized content part field: {extra[0]}",
                               param=f"{param}.content[{j}].{extra[0]}",
                               code="unknown_parameter")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True    # vLLM extension
    chat_template_kwargs: Optional[dict[str, Any]] = None
    echo: bool = False                    # vLLM: prefix the last assistant message

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs requires logprobs=true", param="top_logprobs")
        if self.response_format is not None:
            kind = self.response_format.get("type")
            if kind is None:
                raise APIError("response_format.type is required", param="response_format.type")
            if kind != "text":
                raise unsupported("response_format.type", f"response_format type {kind!r} "
                                  "is not supported (only 'text')")
            extra = sorted(set(self.response_format) - {"type"})
            if extra:
                raise APIError(f"Unrecognized request argument supplied: response_format."
                               f"{extra[0]}", param=f"response_format.{extra[0]}",
                               code="unknown_parameter")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise unsupported(name, f"{name} are not supported by this server")
        if self.tool_choice is not None and self.tool_choice != "none":
            raise unsupported("tool_choice", "tool_choice is not supported (no tools)")
        if self.function_call is not None and self.function_call != "none":
            raise unsupported("function_call", "function_call is not supported (no tools)")
        if self.parallel_tool_calls is not None:
            raise unsupported("parallel_tool_calls",
                              "parallel_tool_calls is only allowed together with tools")
        for i, m in enumerate(self.messages):
            if m.role == "tool":
                raise unsupported(f"messages[{i}].role", "tool messages are not supported "
                                  "(this server does not support tools)")
            if m.tool_calls:
                raise unsupported(f"messages[{i}].tool_calls", "assistant tool_calls are "
                                  "not supported (this server does not support tools)")
            if m.tool_call_id is not None:
                raise unsupported(f"messages[{i}].tool_call_id")
        for key in self.chat_template_kwargs or {}:
            if key in RESERVED_TEMPLATE_KWARGS or not key.isidentifier():
                raise APIError(f"chat_template_kwargs may not set {key!r}",
                               param=f"chat_template_kwargs.{key}", code="invalid_value")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise APIError("max_tokens and max_completion_tokens disagree",
                           param="max_completion_tokens")
        wanted = self.wanted_max_tokens()
        if wanted is not None and self.min_tokens > wanted:
            raise APIError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({wanted})",
                           param="min_tokens", code="invalid_value")

    def wanted_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the plain dicts HF chat templates expect."""
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            d = {"role": role, "content": m.text(f"messages[{i}]")}
            if m.name:
                d["name"] = m.name
            out.append(d)
        return out
