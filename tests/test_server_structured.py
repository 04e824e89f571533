"""OpenAI constraint fields -> StructuredOutputsParams (response_format, structured_outputs,
forced tool calls), their errors naming the field, and forced outputs -> tool_calls."""
from __future__ import annotations

import json

import pytest

from minikernels.server.structured import (ConstraintError, calls_from_forced_output,
                                           forced_tool_constraint, from_response_format,
                                           from_structured_outputs)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}}]


def test_response_format():
    assert from_response_format(None) is None
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}).json_object
    p = from_response_format({"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "object"}}})
    assert p.json == {"type": "object"}
    for bad, param in [({"type": "xml"}, "response_format.type"),
                       ({}, "response_format"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}},
                        "response_format.json_schema.schema"),
                       ({"type": "json_object", "foo": 1}, "response_format")]:
        with pytest.raises(ConstraintError) as e:
            from_response_format(bad)
        assert e.value.param == param


def test_structured_outputs_field():
    assert from_structured_outputs({"regex": "a+"}).regex == "a+"
    assert from_structured_outputs({"choice": ["x", "y"]}).choice == ["x", "y"]
    with pytest.raises(ConstraintError, match="unknown fields"):
        from_structured_outputs({"regex": "a", "bogus": 1})
    with pytest.raises(ConstraintError, match="exactly one of"):
        from_structured_outputs({"regex": "a", "choice": ["b"]})


def test_forced_tools():
    assert forced_tool_constraint(TOOLS, "auto") is None
    assert forced_tool_constraint(TOOLS, None) is None
    named, name = forced_tool_constraint(
        TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert name == "get_weather" and named.json["required"] == ["city"]
    req, none = forced_tool_constraint(TOOLS, "required", parallel_tool_calls=False)
    assert none is None and req.json["maxItems"] == 1 and req.json["minItems"] == 1
    assert len(req.json["items"]["anyOf"]) == 2
    with pytest.raises(ConstraintError) as e:
        forced_tool_constraint(TOOLS, {"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"
    with pytest.raises(ConstraintError) as e:
        forced_tool_constraint([{"type": "retrieval"}], "required")
    assert e.value.param == "tools[0]"
    with pytest.raises(ConstraintError) as e:
        forced_tool_constraint(TOOLS, "sometimes")
    assert e.value.param == "tool_choice"


def test_calls_from_forced_output():
    calls = calls_from_forced_output('{"city": "Paris"}', "get_weather")
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    calls = calls_from_forced_output(
        '[{"name": "now", "parameters": {}}, {"name": "get_weather", '
        '"parameters": {"city": "Oslo"}}]', None)
    assert [c.name for c in calls] == ["now", "get_weather"]
    assert calls_from_forced_output('[{"name": "now", "param', None) == []
