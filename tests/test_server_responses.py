"""OpenAI's Responses API (``POST /v1/responses``) through the official ``openai`` client.

The tiny built-in model (random weights, byte tokenizer) on the real engine behind a live
server. A response equals the chat completion of the same conversation and sampling
(same prompt tokens, same text); streamed events follow OpenAI's order (the client's own
``responses.stream`` accumulator checks them) and add up to the final response;
``responses.parse`` with a pydantic model; function tools (required / named, streamed and
not) and the round trip (call -> function_call_output -> answer); unsupported or bad
fields are 400s naming the Responses field.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from test_server_tools import KEY, MODEL, client, engine, server

from minikernels.server import create_app
from minikernels.server.testing import LiveServer

# The tool-calling tests' fixtures (the tiny model on the real engine behind a live
# server with the hermes parser), instantiated again for this module.
__all__ = ["client", "engine", "server"]

WEATHER = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Oslo", "Lima"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather.",
          "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
             "required": ["tz"], "additionalProperties": False}}]
SCHEMA_OF = {t["name"]: t["parameters"] for t in TOOLS}


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/responses", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


CONVERSATION = [{"role": "user", "content": "Hi there."},
                {"role": "assistant", "content": [{"type": "output_text",
                                                   "text": "Hello!"}]},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Tell me "},
                             {"type": "input_text", "text": "a story."}]}]


def test_response_equals_the_chat_completion_of_the_same_conversation(client):
    r = client.responses.create(model=MODEL, instructions="Be brief.", input=CONVERSATION,
                                max_output_tokens=12, temperature=1.0,
                                extra_body={"seed": 7})
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=1.0, seed=7,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi there."},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Tell me a story."}])
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.input_tokens + 12
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert item.content[0].type == "output_text"
    assert (r.instructions, r.max_output_tokens, r.temperature, r.store) == \
        ("Be brief.", 12, 1.0, False)
    # a plain string input is one user message
    s = client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=5,
                                temperature=0)
    c = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "user", "content": "Tell me a story."}])
    assert s.output_text == c.choices[0].message.content


def _raw_events(server, body: dict) -> list[dict]:
    """The SSE events of a streamed request, each ``event:`` name checked against its
    data's ``type``."""
    events = []
    with httpx.stream("POST", server.base_url + "/v1/responses", timeout=60,
                      json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                ev = json.loads(line[len("data: "):])
                assert ev["type"] == name
                events.append(ev)
    return events


def test_server_output_validates_against_openai_types(server):
    """Every streamed event and the unstreamed response validate against the official
    client's pydantic types in strict (validating, not constructing) mode."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    parse = TypeAdapter(ResponseStreamEvent).validate_python
    for body in ({"input": "Hi", "max_output_tokens": 6},
                 {"input": "Weather?", "tools": TOOLS, "tool_choice": "required",
                  "max_output_tokens": 300, "temperature": 1.0, "seed": 1},
                 {"input": "Well?", "text": {"format": {
                     "type": "json_schema", "name": "a", "strict": True,
                     "schema": {"type": "string", "enum": ["yes", "no"]}}}}):
        body = {"model": MODEL, **body}
        for ev in _raw_events(server, body):
            parse(ev)
        r = _post(server, body)
        assert r.status_code == 200
        Response.model_validate(r.json())


def test_stream_events_follow_openai_order_and_add_up(client):
    kw = dict(model=MODEL, input="Write something.", max_output_tokens=10, temperature=1.0,
              extra_body={"seed": 3})
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text == events[-4].text
    assert final.usage.output_tokens == 10 and final.status == "incomplete"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    once = client.responses.create(**kw)
    assert once.output_text == text
    # the client's accumulating helper checks item / part indexes as it goes (and wants
    # response.completed: a constrained output that ends)
    fmt = {"format": {"type": "json_schema", "name": "answer",
                      "schema": {"type": "string", "enum": ["yes", "no", "maybe"]}}}
    with client.responses.stream(model=MODEL, input="Well?", text=fmt, temperature=1.0,
                                 max_output_tokens=50) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output_text == "".join(deltas)
    assert json.loads(final.output_text) in ("yes", "no", "maybe")


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


def test_parse_with_a_pydantic_model(client):
    r = client.responses.parse(model=MODEL, input="Describe a person.",
                               text_format=Person, max_output_tokens=300, temperature=1.0,
                               extra_body={"seed": 2})
    assert isinstance(r.output_parsed, Person)
    assert Person.model_validate_json(r.output_text) == r.output_parsed
    completed = 0
    for seed in range(4):     # a random model may write past max_output_tokens: seeded
        raw = _post_json(client, {"model": MODEL, "input": "JSON please.", "seed": seed,
                                  "temperature": 1.0, "max_output_tokens": 200,
                                  "text": {"format": {"type": "json_object"}}})
        assert raw["text"] == {"format": {"type": "json_object"}}
        if raw["status"] == "completed":
            completed += 1
            assert isinstance(json.loads(raw["output"][0]["content"][0]["text"]), dict)
        else:
            assert raw["incomplete_details"] == {"reason": "max_output_tokens"}
    assert completed


def _post_json(client, body: dict) -> dict:
    r = httpx.post(str(client.base_url) + "responses", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def _calls(client, stream: bool, **kw) -> tuple[list[dict], object]:
    """([{call_id, name, arguments}], final response) of one request with tools."""
    kw = {"model": MODEL, "input": "What's the weather?", "tools": TOOLS,
          "max_output_tokens": 300, "temperature": 1.0, **kw}
    if not stream:
        r = client.responses.create(**kw)
    else:
        events = list(client.responses.create(stream=True, **kw))
        r = events[-1].response
        args: dict[str, str] = {}
        for e in events:
            if e.type == "response.output_item.added" and e.item.type == "function_call":
                assert e.item.arguments == "" and e.item.status == "in_progress"
                args[e.item.id] = ""
            elif e.type == "response.function_call_arguments.delta":
                args[e.item_id] += e.delta
            elif e.type == "response.function_call_arguments.done":
                assert e.arguments == args[e.item_id]
        assert args == {i.id: i.arguments for i in r.output if i.type == "function_call"}
    calls = [{"call_id": i.call_id, "name": i.name, "arguments": i.arguments}
             for i in r.output if i.type == "function_call"]
    return calls, r


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_function_call_round_trip(client, stream, choice):
    tool_choice = "required" if choice == "required" else \
        {"type": "function", "name": "get_weather"}
    calls, r = _calls(client, stream, tool_choice=tool_choice, parallel_tool_calls=False,
                      extra_body={"seed": 4})
    assert r.status == "completed" and len(calls) == 1 and len(r.output) == 1
    call = calls[0]
    assert call["call_id"].startswith("call_") and r.output[0].id.startswith("fc_")
    if choice == "named":
        assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), SCHEMA_OF[call["name"]])
    # the previous output goes back as input, with the function's result
    history = [{"role": "user", "content": "What's the weather?"}]
    history += [item.model_dump(exclude_none=True) for item in r.output]
    history.append({"type": "function_call_output", "call_id": call["call_id"],
                    "output": "sunny, 21 C"})
    answer = client.responses.create(model=MODEL, input=history, tools=TOOLS,
                                     tool_choice="none", max_output_tokens=6,
                                     temperature=1.0)
    assert answer.output[0].type == "message" and answer.output_text
    assert answer.usage.input_tokens > r.usage.input_tokens   # the call and its result
    chat = client.chat.completions.create(
        model=MODEL, tools=[{"type": "function", "function": {
            k: v for k, v in t.items() if k != "type"}} for t in TOOLS],
        tool_choice="none", max_tokens=6, temperature=1.0, messages=[
            {"role": "user", "content": "What's the weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call["call_id"], "type": "function",
                 "function": {"name": call["name"], "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": call["call_id"], "content": "sunny, 21 C"}])
    assert chat.usage.prompt_tokens == answer.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_required_parallel_calls(client, stream):
    calls, r = _calls(client, stream, tool_choice="required", extra_body={"seed": 5})
    assert calls and r.status == "completed"
    for c in calls:
        jsonschema.validate(json.loads(c["arguments"]), SCHEMA_OF[c["name"]])
    assert len({c["call_id"] for c in calls}) == len(calls)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "critic", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                 "arguments": "[1]"}]}, "input[0].tool_calls[0].function.arguments"),
    ({"input": []}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": 3}]},
     "tools[0].parameters"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "colour": 1}]},
     "tools[0].colour"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n",
                                        "schema": {"type": "object", "minProperties": "x"}}}},
     "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 5000}, "max_output_tokens"),
    ({"input": "x" * 3000}, "input"),
    ({"input": "x", "colour": "red"}, "colour"),
])
def test_bad_requests_are_400_naming_the_field(server, client, body, param):
    r = _post(server, {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert client.responses.create(model=MODEL, input="ok", max_output_tokens=2).output_text


def test_developer_and_reasoning_items(client):
    """A developer message renders as a system message; another model's reasoning items
    in the history are skipped."""
    a = client.responses.create(model=MODEL, max_output_tokens=4, temperature=0, input=[
        {"role": "developer", "content": "Rules."},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "user", "content": "Go."}])
    b = client.responses.create(model=MODEL, max_output_tokens=4, temperature=0,
                                instructions="Rules.", input="Go.")
    assert a.output_text == b.output_text and a.usage.input_tokens == b.usage.input_tokens


def test_event_builder_cancel_and_failure_shapes():
    """The stream builder without a server: sequence numbers, a message then a call, a
    response the server aborted (cancelled, streamed as response.failed with an error
    code) and an engine failure after the stream began (error, then response.failed)."""
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from minikernels.server.responses import ResponseEvents, ResponsesRequest

    echo = ResponsesRequest(input="x").echo_fields(1.0, 1.0)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 1}}
    b = ResponseEvents("resp_1", 0, MODEL, echo)
    events = b.start() + b.feed("Hi", []) + b.feed("", [
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "f", "arguments": '{"a"'}},
        {"index": 0, "function": {"arguments": ": 1}"}}]) + b.finish("abort", usage)
    parse = TypeAdapter(ResponseStreamEvent).validate_python
    typed = [parse(e) for e in events]
    assert [e.sequence_number for e in typed] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.failed"]
    final = typed[-1].response
    assert final.status == "cancelled" and final.error.code == "server_error"
    assert "shutting down" in final.error.message
    assert [i.type for i in final.output] == ["message", "function_call"]
    assert final.output[1].arguments == '{"a": 1}' and final.output[1].call_id == "call_1"
    assert final.usage.input_tokens_details.cached_tokens == 1
    f = ResponseEvents("resp_2", 0, MODEL, echo)
    out = f.start() + f.fail({"code": "x", "message": "engine died", "param": None})
    for ev in out:
        parse(ev)
    assert [e["type"] for e in out][-2:] == ["error", "response.failed"]
    assert out[-2]["code"] == "x"
    assert out[-1]["response"]["error"] == {"code": "server_error", "message": "engine died"}
    # nothing generated at all: one empty message, as the unstreamed response has
    e = ResponseEvents("resp_3", 0, MODEL, echo)
    done = e.start() + e.finish("stop", usage)
    for ev in done:
        parse(ev)
    assert done[-1]["type"] == "response.completed"
    assert done[-1]["response"]["output"][0]["content"][0]["text"] == ""


# ------------------------------------------------------------------ stored responses
KEY_B = "responses-test-key-b"


@pytest.fixture(scope="module")
def stored(engine):
    """A second server on the same engine that keeps the latest 3 responses per the
    store, with two API keys."""
    app = create_app(engine, api_key=[KEY, KEY_B], served_model_name=MODEL,
                     tool_call_parser="hermes", responses_store_size=3)
    with LiveServer(app) as srv:
        yield srv


def _clients(srv):
    return [openai.OpenAI(base_url=srv.base_url + "/v1", api_key=k, max_retries=0, timeout=60)
            for k in (KEY, KEY_B)]


def _chat_prompt_tokens(client, messages, **kw) -> int:
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                          **kw).usage.prompt_tokens


def test_previous_response_id_continues_the_stored_conversation(stored):
    a, _ = _clients(stored)
    r1 = a.responses.create(model=MODEL, instructions="Old rules.", input="Hi there.",
                            max_output_tokens=6, temperature=0)
    assert r1.store is True
    got = a.responses.retrieve(r1.id)
    assert got.model_dump() == r1.model_dump()
    r2 = a.responses.create(model=MODEL, previous_response_id=r1.id, instructions="New.",
                            input="And then?", max_output_tokens=4, temperature=0)
    assert r2.previous_response_id == r1.id
    # the earlier input and output, not the earlier instructions
    assert r2.usage.input_tokens == _chat_prompt_tokens(a, [
        {"role": "system", "content": "New."}, {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": r1.output_text},
        {"role": "user", "content": "And then?"}])
    # streamed responses are stored too, as their final event shows them
    events = list(a.responses.create(model=MODEL, previous_response_id=r2.id, stream=True,
                                     input="Go on.", max_output_tokens=3, temperature=0))
    final = events[-1].response
    assert a.responses.retrieve(final.id).model_dump() == final.model_dump()


def test_function_call_output_continues_a_stored_call(stored):
    a, _ = _clients(stored)
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
             for t in TOOLS]
    r1 = a.responses.create(model=MODEL, input="What's the weather?", tools=TOOLS,
                            tool_choice={"type": "function", "name": "get_weather"},
                            max_output_tokens=200, temperature=1.0, extra_body={"seed": 4})
    [call] = [i for i in r1.output if i.type == "function_call"]
    r2 = a.responses.create(model=MODEL, previous_response_id=r1.id, tools=TOOLS,
                            tool_choice="none", max_output_tokens=4, temperature=0,
                            input=[{"type": "function_call_output", "call_id": call.call_id,
                                    "output": "sunny"}])
    assert r2.output[0].type == "message"
    assert r2.usage.input_tokens == _chat_prompt_tokens(a, [
        {"role": "user", "content": "What's the weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}],
        tools=tools, tool_choice="none")


def test_stored_responses_belong_to_their_key_and_are_bounded(stored):
    a, b = _clients(stored)
    r = a.responses.create(model=MODEL, input="mine", max_output_tokens=2)
    for call in (lambda: b.responses.retrieve(r.id),
                 lambda: b.responses.create(model=MODEL, previous_response_id=r.id,
                                            input="x", max_output_tokens=2)):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert r.id in str(exc.value)
    kept = a.responses.create(model=MODEL, input="no", max_output_tokens=2, store=False)
    assert kept.store is False
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(kept.id)
    # capacity 3: three more responses push r out (least recently used first)
    for _ in range(3):
        a.responses.create(model=MODEL, input="next", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(r.id)
    # delete
    last = a.responses.create(model=MODEL, input="bye", max_output_tokens=2)
    d = httpx.delete(f"{stored.base_url}/v1/responses/{last.id}", timeout=30,
                     headers={"Authorization": f"Bearer {KEY}"})
    assert d.status_code == 200
    assert d.json() == {"id": last.id, "object": "response.deleted", "deleted": True}
    d2 = httpx.delete(f"{stored.base_url}/v1/responses/{last.id}", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert d2.status_code == 404 and d2.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{stored.base_url}/v1/responses/{last.id}", timeout=30).status_code \
        == 401


def test_without_a_store_nothing_is_kept(server, client):
    r = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_logprobs_in_parts_and_deltas_equal_chat(server, client):
    """include message.output_text.logprobs (+ top_logprobs): the output_text part holds
    one entry per token, equal to chat's logprobs for the same sampling (the values to
    1e-4: a prefix-cache hit computes the prompt in other chunks); streamed deltas carry
    them too and add up to the same list."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    body = {"model": MODEL, "input": "Tell me something.", "max_output_tokens": 8,
            "temperature": 0, "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    r = _post(server, body)
    assert r.status_code == 200, r.text
    Response.model_validate(r.json())
    part = r.json()["output"][0]["content"][0]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me something."}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    want = [c.model_dump() for c in chat.choices[0].logprobs.content]
    _same_logprobs(part["logprobs"], want)
    assert len(want) == 8
    assert all(len(e["top_logprobs"]) == 2 for e in part["logprobs"])
    assert "".join(e["token"] for e in part["logprobs"]) == part["text"]
    events = _raw_events(server, body)
    parse = TypeAdapter(ResponseStreamEvent).validate_python
    for ev in events:
        parse(ev)
    streamed = [lp for ev in events if ev["type"] == "response.output_text.delta"
                for lp in ev["logprobs"]]
    _same_logprobs(streamed, want)
    done = [ev for ev in events if ev["type"] == "response.output_text.done"][0]
    assert done["logprobs"] == streamed
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == streamed
    bad = _post(server, {**body, "include": ["message.output_text.logprobs",
                                             "reasoning.encrypted_content"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "include[1]"
    alone = _post(server, {"model": MODEL, "input": "x", "top_logprobs": 2})
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "top_logprobs"


def _same_logprobs(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["token"], g["bytes"]) == (w["token"], w["bytes"])
        assert abs(g["logprob"] - w["logprob"]) <= 1e-4
        assert [(t["token"], t["bytes"]) for t in g["top_logprobs"]] == \
            [(t["token"], t["bytes"]) for t in w["top_logprobs"]]
        for a, b in zip(g["top_logprobs"], w["top_logprobs"]):
            assert abs(a["logprob"] - b["logprob"]) <= 1e-4
