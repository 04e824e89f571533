"""Reasoning parsers (``--reasoning-parser qwen3 / deepseek_r1``): a thinking model's
``<think>`` block split from its answer, whole and in every streamed split; and through
the live server (chat ``reasoning_content``, the Responses API's reasoning item), with a
regex making the tiny random model write a thinking block."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_server_tools import KEY, MODEL, engine

from minikernels.server import create_app
from minikernels.server.reasoning import (ReasoningParser, constraint_start_marker,
                                          prompt_closes_thinking, prompt_opens_thinking)
from minikernels.server.testing import LiveServer

__all__ = ["engine"]  # the tool-calling tests' engine fixture, re-exported for pytest

CASES = [  # (parser, prompt opens <think>, output, reasoning, answer)
    ("qwen3", False, "<think>\nplan it\n</think>\n\nAnswer.", "\nplan it\n", "Answer."),
    ("qwen3", False, "Just an answer.", None, "Just an answer."),
    ("qwen3", False, "  <think>a</think>b", "a", "b"),
    ("qwen3", False, "<thin", None, "<thin"),
    ("qwen3", True, "plan</think>\n\nAnswer <think>", "plan", "Answer <think>"),
    ("qwen3", False, "<think>cut off mid-thou", "cut off mid-thou", None),
    ("qwen3", False, "<think>only</think>\n", "only", None),
    ("deepseek_r1", False, "plan</think>answer", "plan", "answer"),
    ("deepseek_r1", False, "<think>\nplan</think>answer", "\nplan", "answer"),
    ("deepseek_r1", False, "never closed", "never closed", None),
    ("deepseek_r1", False, "a</thi", "a</thi", None),
]


@pytest.mark.parametrize(("name", "opens", "text", "reasoning", "answer"), CASES)
def test_split_whole(name, opens, text, reasoning, answer):
    assert ReasoningParser(name, opens).split(text) == (reasoning, answer)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize(("name", "opens", "text", "reasoning", "answer"), CASES)
def test_streaming_equals_whole(name, opens, text, reasoning, answer, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    parser = ReasoningParser(name, opens)
    got_r, got_a = "", ""
    for i, piece in enumerate(pieces):
        r, a = parser.feed(piece, final=i == len(pieces) - 1)
        got_r += r
        got_a += a
    assert got_r == (reasoning or "") and got_a == (answer or "")


def test_prompt_tail_and_names():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
    # Qwen3's enable_thinking=false generation prompt closes the block: no waiting
    assert prompt_closes_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_closes_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_closes_thinking("say </think> please<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ReasoningParser("o1")
    from minikernels.server.reasoning import REASONING_PARSERS
    from minikernels.server.settings import REASONING_PARSERS as CLI

    assert REASONING_PARSERS == CLI


# --------------------------------------------------------------------------- server
# The constraint covers the thinking too (--structured-outputs-in-reasoning): a regex
# makes the tiny random model write a thinking block.
THINK = {"structured_outputs": {"regex": "<think>[a-z]{3,12}</think>\\n\\nHello!"}}


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, api_key=KEY, served_model_name=MODEL, reasoning_parser="qwen3",
                     tool_call_parser="hermes", structured_outputs_in_reasoning=True)
    with LiveServer(app) as srv:
        yield srv


def test_constraint_waits_for_the_end_of_thinking(engine):
    """Default (vLLM's): with a reasoning parser a constraint starts after ``</think>``
    (the engine's ``start_after``). The tiny model never writes ``</think>``, so its
    output stays free: the same text as the unconstrained request; the marker is the
    tokenizer's ids of ``</think>``."""
    app = create_app(engine, api_key=KEY, served_model_name=MODEL, reasoning_parser="qwen3")
    assert constraint_start_marker(engine.tokenizer) == list(b"</think>")
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
              temperature=1.0, seed=4)
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0)
        free = client.chat.completions.create(**kw).choices[0].message.content
        for extra in (THINK, {"response_format": {"type": "json_object"}}):
            m = client.chat.completions.create(**kw, extra_body=extra).choices[0].message
            assert m.content == free, extra
    with LiveServer(create_app(engine, api_key=KEY, served_model_name=MODEL)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0)
        m = client.chat.completions.create(**kw, extra_body=THINK).choices[0].message
        assert m.content != free and m.content.startswith("<think>")   # no parser: at once


def test_chat_reasoning_content(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=60,
              temperature=1.0, seed=2, extra_body=THINK)
    m = client.chat.completions.create(**kw).choices[0].message
    thought = m.model_extra["reasoning_content"]
    assert m.content == "Hello!" and thought.isalpha() and 3 <= len(thought) <= 12
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed_r = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                         for c in chunks if c.choices)
    streamed_c = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (streamed_r, streamed_c) == (thought, "Hello!")
    off = client.chat.completions.create(**{**kw, "extra_body": {
        **THINK, "include_reasoning": False}}).choices[0].message
    assert off.content == "Hello!" and "reasoning_content" not in (off.model_extra or {})
    # no thinking block: all content, reasoning_content null
    plain = client.chat.completions.create(model=MODEL, max_tokens=20,
                                           messages=[{"role": "user", "content": "Hi"}],
                                           extra_body={"structured_outputs": {
                                               "regex": "Hey there"}}).choices[0].message
    assert plain.content == "Hey there" and plain.model_extra["reasoning_content"] is None


def test_responses_reasoning_item(server):
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 60, "temperature": 1.0,
            "seed": 2, **THINK}
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.base_url + "/v1/responses", json=body, headers=headers,
                   timeout=60).json()
    Response.model_validate(r)
    assert [i["type"] for i in r["output"]] == ["reasoning", "message"]
    thought = r["output"][0]["content"][0]["text"]
    assert thought.isalpha() and r["output"][1]["content"][0]["text"] == "Hello!"
    parse = TypeAdapter(ResponseStreamEvent).validate_python
    events = []
    with httpx.stream("POST", server.base_url + "/v1/responses", json={**body, "stream": True},
                      headers=headers, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    for ev in events:
        parse(ev)
    kinds = [e["type"] for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert "".join(e["delta"] for e in events
                   if e["type"] == "response.reasoning_text.delta") == thought
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"] == [
        {**r["output"][0], "id": events[-1]["response"]["output"][0]["id"]},
        {**r["output"][1], "id": events[-1]["response"]["output"][1]["id"]}]
