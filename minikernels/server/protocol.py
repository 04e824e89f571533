"""OpenAI request bodies (the subset we serve) and their validation.

Bodies are decoded by :mod:`.jsonbody`, then validated by the pydantic models below in
**strict** mode, like OpenAI's API: ``"max_tokens": "4"``, ``"stream": "true"``,
``"n": true`` and ``"max_tokens": 4.0`` are refused, not coerced. ``null`` for an
optional field means its default. Every field is either honoured or refused with a 400
naming it; an unknown field is refused (``Unrecognized request argument supplied``), never
silently dropped.

Field names and ranges follow OpenAI's API (``logit_bias`` included); vLLM's extra fields
are accepted where the server or engine honours them (``allowed_token_ids``, ``top_k``,
``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, ``min_tokens``, ``include_stop_str_in_output``,
``skip_special_tokens``, ``bad_words``, ``return_tokens_as_token_ids``, ``prompt_logprobs``,
``truncate_prompt_tokens``, ``chat_template_kwargs``,
``add_generation_prompt``, chat ``echo``, ``priority``, ``cache_salt``,
``structured_outputs``; completions ``echo`` with ``logprobs`` returns the prompt tokens'
logprobs), and refused with a 400 where the engine has no support (``cache_salt`` on an
engine without salted prefix caching).

Output constraints (:mod:`.structured`): ``response_format`` (``json_object`` /
``json_schema``) and vLLM's ``structured_outputs`` on both routes; chat ``tools`` with
``tool_choice`` ``"required"`` or a named function constrain the output to the functions'
schemas. At most one constraint per request.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StringConstraints,
                      ValidationError, field_validator, model_validator)

from .errors import APIError, unsupported
from .jsonbody import format_path
from .structured import (ConstraintError, StructuredOutputsParams, forced_tool_constraint,
                         from_response_format, from_structured_outputs, function_specs)

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
    logit_bias: Optional[dict[str, float]] = None   # {"token id": bias in [-100, 100]}
    user: Optional[str] = None          # OpenAI's end-user id: no effect on the output
    # vLLM extensions (sent by the openai client via extra_body)
    allowed_token_ids: Optional[list[StrictInt]] = Field(None, min_length=1)
    top_k: Optional[int] = Field(None, ge=-1)   # -1 or 0 = off
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    # Below 0.01 the fp32 logits / penalty overflow and the probabilities become NaN.
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[StrictInt]] = None
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's: logprob tokens as "token_id:<id>" strings (exact ids for RL trainers)
    return_tokens_as_token_ids: bool = False
    # vLLM's: each prompt token's logprob and the top k alternatives, in the response's
    # "prompt_logprobs" (not with stream, as vLLM)
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # words the output never contains (tokenized once per request on the engine thread:
    # bounded so one request cannot stall the others)
    bad_words: Optional[list[Annotated[str, StringConstraints(min_length=1, max_length=256)]]] \
        = Field(None, max_length=128)
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)
    priority: int = Field(0, ge=-(2 ** 63), lt=2 ** 63)   # lower runs first (vLLM's)
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=1024)
    # Output constraints: OpenAI's response_format (vLLM takes it on completions too) and
    # vLLM's structured_outputs; checked by .structured (400 naming the field).
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None

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
        if self.prompt_logprobs is not None and self.stream:
            raise APIError("prompt_logprobs is not available with stream=true",
                           param="prompt_logprobs")
        self.token_biases()
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise APIError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                           f"({self.max_tokens})", param="min_tokens", code="invalid_value")
        self.constraint()

    def token_biases(self) -> Optional[dict[int, float]]:
        """``logit_bias`` with int token ids (OpenAI sends the ids as strings); a 400 naming
        ``logit_bias.<key>`` for a key that is not a token id or a bias outside
        [-100, 100]."""
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            where = f"logit_bias.{key}"
            if not (key.isascii() and key.isdigit()) or len(key) > 12:
                raise APIError(f"logit_bias keys must be token ids, got {key!r}",
                               param=where, code="invalid_value")
            if not (-100.0 <= bias <= 100.0):     # (NaN fails this too)
                raise APIError(f"a logit bias must be in [-100, 100], got {bias}",
                               param=where, code="invalid_value")
            out[int(key)] = float(bias)
        return out

    def constraint(self) -> Optional["Constraint"]:
        """The request's output constraint (None: free text); APIError naming the field."""
        try:
            rf = from_response_format(self.response_format)
            so = from_structured_outputs(self.structured_outputs)
        except ConstraintError as exc:
            raise constraint_error(exc) from None
        if rf is not None and so is not None:
            raise APIError("response_format and structured_outputs cannot both constrain "
                           "the output; send one of them", param="structured_outputs",
                           code="invalid_value")
        if rf is not None:
            param = "response_format.json_schema.schema" if rf.json is not None \
                else "response_format"
            return Constraint(rf, param)
        if so is not None:
            return Constraint(so, f"structured_outputs.{so.kind}")
        return None


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


class Constraint:
    """An output constraint and the request field a compile error is blamed on.

    forced: tool_choice "required" / a named function (``tool_name``; None = "required"):
    the output is the calls' JSON (see :func:`.structured.calls_from_forced_output`).
    """

    def __init__(self, params: StructuredOutputsParams, param: str, forced: bool = False,
                 tool_name: Optional[str] = None) -> None:
        self.params = params
        self.param = param
        self.forced = forced
        self.tool_name = tool_name


def constraint_error(exc: ConstraintError) -> APIError:
    return APIError(f"{exc.param}: {exc}" if not str(exc).startswith(exc.param) else str(exc),
                    param=exc.param, code="invalid_value")


class FunctionCall(_Strict):
    name: str = Field(..., min_length=1)
    arguments: str


class ToolCallItem(_Strict):
    id: str = Field(..., min_length=1)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallItem]] = None
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
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True    # vLLM extension
    chat_template_kwargs: Optional[dict[str, Any]] = None
    echo: bool = False                    # vLLM: prefix the last assistant message
    include_reasoning: bool = True        # vLLM: with --reasoning-parser, send the thinking

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs requires logprobs=true", param="top_logprobs")
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise unsupported(name, f"{name} is deprecated and not supported by this "
                                  "server: use tools / tool_choice")
        self._check_tools()
        self._check_messages()
        self.check_common()        # (after the tools: the constraint needs them checked)
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

    # ------------------------------------------------------------------ tools
    def _check_tools(self) -> None:
        if self.tools is not None:
            try:
                function_specs(self.tools)
            except ConstraintError as exc:
                raise constraint_error(exc) from None
            for i, tool in enumerate(self.tools):
                fn = tool["function"]
                unknown = sorted(set(tool) - {"type", "function"}) or \
                    sorted(set(fn) - {"name", "description", "parameters", "strict"})
                if unknown:
                    where = f"tools[{i}]" if set(tool) - {"type", "function"} \
                        else f"tools[{i}].function"
                    raise APIError(f"Unrecognized request argument supplied: "
                                   f"{where}.{unknown[0]}", param=f"{where}.{unknown[0]}",
                                   code="unknown_parameter")
                if "description" in fn and not isinstance(fn["description"], str):
                    raise APIError("a function description must be a string",
                                   param=f"tools[{i}].function.description")
                if "strict" in fn and not isinstance(fn["strict"], (bool, type(None))):
                    raise APIError("function strict must be a boolean",
                                   param=f"tools[{i}].function.strict")
        choice = self.tool_choice
        if choice is None:
            pass
        elif isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise APIError(f'tool_choice must be "none", "auto", "required" or '
                               f'{{"type": "function", "function": {{"name": ...}}}}, got '
                               f'{choice!r}', param="tool_choice", code="invalid_value")
        elif not (isinstance(choice, dict) and choice.get("type") == "function"
                  and isinstance(choice.get("function"), dict)
                  and isinstance(choice["function"].get("name"), str)
                  and set(choice) == {"type", "function"}
                  and set(choice["function"]) == {"name"}):
            raise APIError('tool_choice must be "none", "auto", "required" or '
                           '{"type": "function", "function": {"name": ...}}',
                           param="tool_choice", code="invalid_value")
        if not self.tools:
            if choice not in (None, "none"):
                raise APIError("tool_choice is only allowed when tools are specified",
                               param="tool_choice", code="invalid_value")
            if self.parallel_tool_calls is not None:
                raise APIError("parallel_tool_calls is only allowed when tools are "
                               "specified", param="parallel_tool_calls", code="invalid_value")

    @property
    def effective_tool_choice(self) -> Any:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def constraint(self) -> Optional[Constraint]:
        base = super().constraint()
        choice = self.effective_tool_choice
        if not self.tools or choice in ("none", "auto"):
            return base
        try:
            forced = forced_tool_constraint(self.tools, choice,
                                            self.parallel_tool_calls is not False)
        except ConstraintError as exc:
            raise constraint_error(exc) from None
        assert forced is not None
        if base is not None:
            field = "response_format" if self.response_format is not None and \
                self.response_format.get("type") != "text" else "structured_outputs"
            what = '"required"' if choice == "required" else "(a named function)"
            raise APIError(f"tool_choice {what} constrains the output to the tool calls; "
                           f"it cannot be combined with {field}", param=field,
                           code="invalid_value")
        params, name = forced
        names = [t["function"]["name"] for t in self.tools]
        param = "tools" if name is None else f"tools[{names.index(name)}].function.parameters"
        return Constraint(params, param, forced=True, tool_name=name)

    def _check_messages(self) -> None:
        for i, m in enumerate(self.messages):
            if m.tool_calls is not None and m.role != "assistant":
                raise APIError("only assistant messages may carry tool_calls",
                               param=f"messages[{i}].tool_calls", code="invalid_value")
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise APIError("a tool message needs the tool_call_id it answers",
                                   param=f"messages[{i}].tool_call_id", code="invalid_value")
            elif m.tool_call_id is not None:
                raise APIError("only tool messages may carry a tool_call_id",
                               param=f"messages[{i}].tool_call_id", code="invalid_value")
            for j, call in enumerate(m.tool_calls or []):
                try:
                    args = json.loads(call.function.arguments)
                except ValueError:
                    args = None
                if not isinstance(args, dict):
                    raise APIError("tool call arguments must be the JSON text of an object",
                                   param=f"messages[{i}].tool_calls[{j}].function.arguments",
                                   code="invalid_value")
            m.text(f"messages[{i}]")      # content parts checked here, not mid-render

    def wanted_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the plain dicts HF chat templates expect.

        Assistant tool calls carry their arguments as a dict (what chat templates
        render with ``tojson``; vLLM does the same), tool messages their
        ``tool_call_id``.
        """
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            d: dict[str, Any] = {"role": role, "content": m.text(f"messages[{i}]")}
            if m.name:
                d["name"] = m.name
            if m.tool_calls:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name,
                                  "arguments": json.loads(c.function.arguments)}}
                    for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out


# ------------------------------------------------------------------ tokenize / detokenize
MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeCompletionRequest(_Strict):
    """vLLM's ``POST /tokenize`` with a ``prompt``: its token ids."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False

    def check(self) -> None:
        pass


class TokenizeChatRequest(_Strict):
    """vLLM's ``POST /tokenize`` with ``messages``: the ids of the rendered chat (the same
    prompt /v1/chat/completions would run)."""

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    tools: Optional[list[Any]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False

    def check(self) -> None:
        if self.add_special_tokens:
            raise unsupported("add_special_tokens", "add_special_tokens=true is not supported "
                              "for chat: the chat template writes the special tokens")

    def as_chat_request(self) -> "ChatCompletionRequest":
        """The equivalent chat request (its checks, its template messages)."""
        req = ChatCompletionRequest.model_validate(
            {"messages": [m.model_dump(exclude_none=True) for m in self.messages],
             "tools": self.tools, "add_generation_prompt": self.add_generation_prompt,
             "chat_template_kwargs": self.chat_template_kwargs})
        req.check()
        return req


class DetokenizeRequest(_Strict):
    """vLLM's ``POST /detokenize``: token ids -> text."""

    model: Optional[str] = None
    tokens: list[int] = Field(..., max_length=MAX_DETOKENIZE_TOKENS)

    def check(self) -> None:
        pass


# ------------------------------------------------------------------ embeddings
EmbeddingInput = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class EmbeddingRequest(_Strict):
    """OpenAI's ``POST /v1/embeddings``: one input or a list (texts or token ids)."""

    model: Optional[str] = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None

    def check(self) -> None:
        pass

    def inputs(self) -> list[Union[str, list[int]]]:
        """The input field as a list of inputs (texts or token-id lists)."""
        x = self.input
        if isinstance(x, str):
            out: list = [x]
        elif len(x) == 0:
            raise APIError("input must not be empty", param="input")
        elif all(isinstance(t, int) for t in x):
            out = [list(x)]
        else:
            out = list(x)
        single = isinstance(x, str) or all(isinstance(t, int) for t in x)
        for i, item in enumerate(out):
            where = "input" if single else f"input[{i}]"
            if len(item) == 0:
                raise APIError("an input must not be empty", param=where)
            if isinstance(item, list) and any(t < 0 for t in item):
                raise APIError("token ids must be >= 0", param=where)
        return out


class ClassificationRequest(EmbeddingRequest):
    """vLLM's ``POST /classify``: one input or a list (texts or token ids); each gets its
    label probabilities."""

    encoding_format: Literal["float"] = "float"
    dimensions: None = None


class ScoreRequest(_Strict):
    """vLLM's ``POST /score`` (``/v1/score``): relevance of (text_1, text_2) pairs, one
    text_1 against every text_2 or the two lists zipped."""

    model: Optional[str] = None
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    user: Optional[str] = None

    def check(self) -> None:
        for name in ("text_1", "text_2"):
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                raise APIError(f"{name} must not be empty", param=name)
        n1 = 1 if isinstance(self.text_1, str) else len(self.text_1)
        n2 = 1 if isinstance(self.text_2, str) else len(self.text_2)
        if n1 != 1 and n1 != n2:
            raise APIError(f"text_1 has {n1} items and text_2 {n2}: give one text_1, or as "
                           "many as text_2", param="text_1")


class RerankRequest(_Strict):
    """The Jina / Cohere rerank API vLLM serves (``/rerank``, ``/v1/rerank``,
    ``/v2/rerank``): documents ranked by relevance to the query; the best ``top_n`` (all
    when absent or 0)."""

    model: Optional[str] = None
    query: str
    documents: list[str]
    top_n: Optional[int] = Field(None, ge=0)
    return_documents: bool = True
    user: Optional[str] = None

    def check(self) -> None:
        if not self.documents:
            raise APIError("documents must not be empty", param="documents")


class LoadLoRAAdapterRequest(_Strict):
    """vLLM's ``POST /v1/load_lora_adapter`` (``--allow-runtime-lora-updating``)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)

    def check(self) -> None:
        pass


class UpdateWeightsFromDiskRequest(_Strict):
    """``POST /update_weights_from_disk`` (SGLang's route; ``--enable-sleep-mode``): the
    served model's weights replaced in place from a safetensors checkpoint directory on
    the server of the same architecture."""

    model_path: str = Field(min_length=1, max_length=4096)

    def check(self) -> None:
        pass


class UnloadLoRAAdapterRequest(_Strict):
    """vLLM's ``POST /v1/unload_lora_adapter``; ``lora_int_id`` is accepted (vLLM's
    field) and must match the adapter's when given."""

    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None

    def check(self) -> None:
        pass
