"""OpenAI request bodies (the subset we serve) and the OpenAI error shape.

Requests are parsed with pydantic into the models below; anything that fails parsing or
range checks becomes an :class:`APIError` with HTTP 400 and OpenAI's JSON shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

Field names and ranges follow OpenAI's API; vLLM's extra sampling fields (``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``) are accepted too.
Unknown fields are ignored, like OpenAI's own server does for forward compatibility.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, ValidationError,
                      field_validator, model_validator)

MAX_N = 64            # choices per request (each one is an engine request)
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16


class APIError(Exception):
    """An error the client caused (or overload); rendered as OpenAI's error JSON."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def validation_to_api_error(exc: ValidationError) -> APIError:
    """First pydantic error -> 400 naming the offending field (``param``)."""
    err = exc.errors()[0]
    # drop pydantic's union-branch labels such as "str" / "list[int]" from the path
    loc = [str(p) for p in err.get("loc", ())
           if str(p) not in ("str", "int") and not str(p).startswith(
               ("list[", "function-", "dict["))]   # (not "stream"/"stream_options")
    param = ".".join(loc) if loc else None
    msg = err.get("msg", "invalid request")
    return APIError(f"{param}: {msg}" if param else msg, param=param,
                    code="invalid_value" if param else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's optional fields are nullable (``"n": null``, ``"stream": null``):
        null means the default, not an error."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

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
    user: Optional[str] = None
    # vLLM extensions (sent by the openai client via extra_body)
    top_k: Optional[int] = Field(None, ge=-1)   # -1 or 0 = off
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[StrictInt]] = None

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

    def check_common(self) -> None:
        """Cross-field checks pydantic field validators cannot express."""
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true",
                           param="stream_options")
        if self.logit_bias:
            raise APIError("logit_bias is not supported", param="logit_bias",
                           code="unsupported_parameter")


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
            raise APIError("suffix is not supported", param="suffix",
                           code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("best_of != n is not supported", param="best_of",
                           code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise APIError("echo together with logprobs is not supported", param="echo",
                           code="unsupported_parameter")

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        """Content as plain text; multi-part content must be all text parts."""
        c = self.content
        if c is None:
            return ""
        if isinstance(c, str):
            return c
        parts = []
        for part in c:
            if part.get("type") != "text":
                raise APIError(f"content part of type {part.get('type')!r} is not supported "
                               "(text only)", param="messages", code="unsupported_parameter")
            if not isinstance(part.get("text"), str):
                raise APIError("a text content part needs a string 'text' field",
                               param="messages")
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
    add_generation_prompt: bool = True    # vLLM extension
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs requires logprobs=true", param="top_logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError("only response_format type 'text' is supported",
                           param="response_format", code="unsupported_parameter")
        if self.tools:
            raise APIError("tools are not supported", param="tools",
                           code="unsupported_parameter")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise APIError("max_tokens and max_completion_tokens disagree",
                           param="max_completion_tokens")

    def wanted_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the plain dicts HF chat templates expect."""
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            d = {"role": role, "content": m.text()}
            if m.name:
                d["name"] = m.name
            out.append(d)
        return out
