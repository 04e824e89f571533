"""Structured outputs and tool calling through the OpenAI server (issue 17, server side).

The tiny built-in model (random weights, byte tokenizer) on the real engine behind a live
server, driven by the official ``openai`` client: JSON-schema / json_object / regex /
choice outputs parse with strict ``json.loads`` and validate; ``chat.completions.parse``
with a pydantic model; tool calls (required, named, auto through the hermes parser) and
their round trip (call -> tool message -> answer), streamed and not; bad constraints and
tool fields are 400s naming the field and the server keeps serving.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from minikernels.engine import AsyncLLM
from minikernels.server import create_app
from minikernels.server.chat import render_chat
from minikernels.server.testing import LiveServer

MODEL = "tiny"
KEY = "tools-test-key"

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                 "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"}, "score": {"type": "number"}},
     "required": ["tags", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
     "maxItems": 4},
    {"type": "object", "properties": {
        "kind": {"const": "point"},
        "at": {"type": "object", "properties": {"x": {"type": "integer", "maximum": 99},
                                                "y": {"type": "integer", "maximum": 99}},
               "required": ["x", "y"], "additionalProperties": False},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]}},
     "required": ["kind", "at", "note"], "additionalProperties": False},
]

WEATHER = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Oslo", "Lima"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
        "required": ["tz"], "additionalProperties": False}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CALL_RE = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", '
           r'"days": [1-7]\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def engine():
    return AsyncLLM.from_args(MODEL, dtype="float32", device="cpu", enforce_eager=True,
                              block_size=16, max_model_len=2048, num_kv_blocks=512)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, api_key=KEY, served_model_name=MODEL, tool_call_parser="hermes")
    with LiveServer(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0,
                         timeout=60)


def chat(client, content="Give me JSON.", **kw):
    kw.setdefault("max_tokens", 300)
    kw.setdefault("temperature", 1.0)
    kw.setdefault("seed", 3)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def strict_json(text: str):
    return json.loads(text)        # strict=True: raw control characters are refused


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(client, i):
    schema = SCHEMAS[i]
    rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                 "strict": True}}
    r = chat(client, response_format=rf, n=2, seed=i)
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(strict_json(c.message.content), schema)
    # completions takes response_format too (as vLLM does)
    r = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=300, seed=i,
                                  temperature=1.0, extra_body={"response_format": rf})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(strict_json(r.choices[0].text), schema)


def test_json_object_and_structured_outputs_json(client):
    r = chat(client, response_format={"type": "json_object"}, max_tokens=400)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(strict_json(r.choices[0].message.content), dict)
    schema = SCHEMAS[0]
    for route in ("chat", "completions"):
        so = {"json": schema}
        if route == "chat":
            text = chat(client, extra_body={"structured_outputs": so}).choices[0]
            text = text.message.content
        else:
            text = client.completions.create(
                model=MODEL, prompt="x", max_tokens=300, temperature=1.0, seed=5,
                extra_body={"structured_outputs": so}).choices[0].text
        jsonschema.validate(strict_json(text), schema)


def test_regex_and_choice_via_extra_body(client):
    pattern = r"[a-z]{2,6}@(mail|web)\.(com|org)"
    r = client.completions.create(model=MODEL, prompt="email:", max_tokens=40, n=3,
                                  temperature=1.0, seed=1,
                                  extra_body={"structured_outputs": {"regex": pattern}})
    assert all(re.fullmatch(pattern, c.text) for c in r.choices), r.choices
    choices = ["yes", "no", "maybe later"]
    r = chat(client, extra_body={"structured_outputs": {"choice": choices}}, n=3)
    assert all(c.message.content in choices for c in r.choices)
    assert all(c.finish_reason == "stop" for c in r.choices)
    grammar = 'root ::= "(" [0-9] ("+" [0-9])* ")"'
    r = chat(client, extra_body={"structured_outputs": {"grammar": grammar}}, max_tokens=60)
    if r.choices[0].finish_reason == "stop":
        assert re.fullmatch(r"\(\d(\+\d)*\)", r.choices[0].message.content)
    # streamed constrained output = the same text as unstreamed (same seed)
    body = dict(max_tokens=40, temperature=1.0, seed=9,
                extra_body={"structured_outputs": {"regex": pattern}})
    whole = chat(client, **body).choices[0].message.content
    parts = [ch.choices[0].delta.content or "" for ch in chat(client, stream=True, **body)
             if ch.choices]
    assert "".join(parts) == whole and re.fullmatch(pattern, whole)


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    tags: list[Literal["a", "b"]] = Field(max_length=2)
    ok: bool


def test_parse_with_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person."}],
        response_format=Person, max_tokens=400, temperature=1.0, seed=11)
    msg = r.choices[0].message
    assert isinstance(msg.parsed, Person)
    assert Person.model_validate_json(msg.content) == msg.parsed


def test_constrained_and_free_requests_together(client):
    def one(k: int):
        if k % 2:
            return chat(client, max_tokens=20, seed=k).choices[0]
        return chat(client, seed=k, response_format={"type": "json_schema", "json_schema": {
            "name": "p", "schema": SCHEMAS[k % len(SCHEMAS)]}}).choices[0]

    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(one, range(6)))
    for k, c in enumerate(outs):
        if k % 2 == 0:
            jsonschema.validate(strict_json(c.message.content), SCHEMAS[k % len(SCHEMAS)])


# ----------------------------------------------------------------------------- tools
def _calls_of_stream(stream) -> tuple[str, list[dict], str]:
    """Accumulate a streamed chat choice like an OpenAI client: (content, calls, finish)."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for d in ch.delta.tool_calls or []:
            if d.index not in calls:       # the first delta of a call names it
                assert d.id and d.type == "function" and d.function.name, d
                calls[d.index] = {"id": d.id, "name": d.function.name,
                                  "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and not (d.function.name or "")
                calls[d.index]["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _ask(client, stream: bool, **kw):
    """(content, [{id, name, arguments}], finish_reason) of one chat request."""
    kw.setdefault("tools", TOOLS)
    if stream:
        return _calls_of_stream(chat(client, "What's the weather?", stream=True, **kw))
    c = chat(client, "What's the weather?", **kw).choices[0]
    calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
             for t in c.message.tool_calls or []]
    return c.message.content, calls, c.finish_reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_tool_call_round_trip(client, stream, choice):
    tool_choice = "required" if choice == "required" else \
        {"type": "function", "function": {"name": "get_weather"}}
    content, calls, finish = _ask(client, stream, tool_choice=tool_choice,
                                  parallel_tool_calls=False)
    assert finish == "tool_calls" and not content and len(calls) == 1, (content, calls)
    call = calls[0]
    assert call["id"].startswith("call_")
    if choice == "named":
        assert call["name"] == "get_weather"
    jsonschema.validate(strict_json(call["arguments"]), SCHEMA_OF[call["name"]])

    # send the call and its result back: the model answers (free text)
    messages = [
        {"role": "user", "content": "What's the weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    kw = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
              max_tokens=8, temperature=1.0, seed=2)
    if stream:
        content, calls2, finish = _calls_of_stream(
            client.chat.completions.create(stream=True, **kw))
    else:
        r = client.chat.completions.create(**kw)
        content, calls2, finish = (r.choices[0].message.content,
                                   r.choices[0].message.tool_calls, r.choices[0].finish_reason)
        assert r.usage.prompt_tokens > 100       # the tools, the call and the result
    assert isinstance(content, str) and not calls2
    assert finish in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_required_parallel_calls(client, stream):
    content, calls, finish = _ask(client, stream, tool_choice="required", seed=5)
    assert finish == "tool_calls" and calls and not content
    for c in calls:
        jsonschema.validate(strict_json(c["arguments"]), SCHEMA_OF[c["name"]])
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes_calls(client, stream):
    # The random model will not write a call on its own: a regex makes it use the format.
    so = {"structured_outputs": {"regex": "Let me check\\. " + CALL_RE + "\\n" + CALL_RE}}
    content, calls, finish = _ask(client, stream, extra_body=so, max_tokens=200)
    assert content == "Let me check." and finish == "tool_calls"
    assert [c["name"] for c in calls] == ["get_weather", "get_weather"]
    for c in calls:
        jsonschema.validate(strict_json(c["arguments"]), WEATHER)
    content, calls, finish = _ask(client, stream, extra_body=so, max_tokens=200,
                                  parallel_tool_calls=False)
    assert len(calls) == 1 and finish == "tool_calls"
    # no call in the output: all content, the usual finish reason
    content, calls, finish = _ask(client, stream, max_tokens=6)
    assert not calls and content and finish in ("stop", "length")
    # tool_choice "none": a call-shaped output stays content
    content, calls, finish = _ask(client, stream, extra_body=so, max_tokens=200,
                                  tool_choice="none")
    assert not calls and "<tool_call>" in content and finish == "stop"


def test_tools_rendered_for_the_byte_tokenizer(engine):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "call_1", "type": "function", "function": {
                     "name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    ids = render_chat(engine.tokenizer, messages, True, None, TOOLS)
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.index("<tools>") < text.index('"get_weather"') < text.index("weather?")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}' \
        in text
    assert text.index("rain") > text.index("<tool_call>")


# ----------------------------------------------------------------------------- errors
BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= nothing_defined"}},
     "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tools[0].function.parameters"),
    ({"tools": TOOLS + [TOOLS[0]]}, "tools[2]"),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_bad_constraints_and_tools_are_400_naming_the_field(server, client, body, param):
    r = _post(server, "/v1/chat/completions", {**BASE, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "Traceback" not in err["message"] and "/project/" not in err["message"]
    # the server keeps serving, constrained requests included
    ok = chat(client, max_tokens=40, extra_body={"structured_outputs": {"choice": ["a", "b"]}})
    assert ok.choices[0].message.content in ("a", "b")


def test_completions_bad_schema_is_400(server):
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4,
                                          "structured_outputs": {"regex": "[z-a]"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex"


def test_auto_needs_a_parser(engine):
    """Without --tool-call-parser "auto" is refused; required / named still work."""
    with LiveServer(create_app(engine, served_model_name=MODEL)) as srv:
        r = _post(srv, "/v1/chat/completions", {**BASE, "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        r = _post(srv, "/v1/chat/completions", {**BASE, "tools": TOOLS, "max_tokens": 100,
                                                "tool_choice": {"type": "function",
                                                                "function": {"name": "get_time"}}})
        assert r.status_code == 200, r.text
        call = r.json()["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_time"
        jsonschema.validate(strict_json(call["function"]["arguments"]), SCHEMA_OF["get_time"])
        r = _post(srv, "/v1/chat/completions", {**BASE, "tools": TOOLS, "tool_choice": "none"})
        assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]
    with pytest.raises(ValueError, match="unknown tool call parser"):
        create_app(engine, tool_call_parser="bogus")


def test_llama3_json_parser(engine):
    call = (r'\{"name": "get_time", "parameters": \{"tz": "(UTC|CET)"\}\}')
    so = {"structured_outputs": {"regex": call + "; " + call}}
    app = create_app(engine, api_key=KEY, served_model_name=MODEL,
                     tool_call_parser="llama3_json")
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0)
        for stream in (False, True):
            content, calls, finish = _ask(client, stream, extra_body=so, max_tokens=200)
            assert not content and finish == "tool_calls"
            assert [c["name"] for c in calls] == ["get_time", "get_time"]
            for c in calls:
                jsonschema.validate(strict_json(c["arguments"]), SCHEMA_OF["get_time"])
            content, calls, finish = _ask(client, stream, max_tokens=6)   # plain text
            assert not calls and content


@pytest.mark.parametrize(("parser", "call_re"), [
    ("pythonic", r'\[get_weather\(city="(Paris|Oslo)", days=[1-7]\), get_time\(tz="UTC"\)\]'),
    ("mistral", r'Sure\.\[TOOL_CALLS\]\[\{"name": "get_weather", "arguments": '
                r'\{"city": "Lima", "days": [1-7]\}\}, \{"name": "get_time", "arguments": '
                r'\{"tz": "CET"\}\}\]'),
])
def test_more_parsers_through_the_server(engine, parser, call_re):
    """--tool-call-parser pythonic / mistral: calls the model writes in that format come
    back as tool_calls, streamed and not (a regex makes the random model write them)."""
    so = {"structured_outputs": {"regex": call_re}}
    app = create_app(engine, api_key=KEY, served_model_name=MODEL, tool_call_parser=parser)
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0)
        for stream in (False, True):
            content, calls, finish = _ask(client, stream, extra_body=so, max_tokens=200)
            assert finish == "tool_calls" and [c["name"] for c in calls] == \
                ["get_weather", "get_time"]
            assert (content or "") == ("Sure." if parser == "mistral" else "")
            for c in calls:
                jsonschema.validate(strict_json(c["arguments"]), SCHEMA_OF[c["name"]])
