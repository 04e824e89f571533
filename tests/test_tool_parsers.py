"""Tool-call parsers (Hermes / Qwen2.5 tags, Llama 3.x JSON, Mistral / Granite / Phi-4-mini
marker + JSON list, Llama 3.2 / 4 pythonic): whole-output parsing, and streaming in every
split of the text gives the same calls and content."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minikernels.server.tool_parsers import get_parser

HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"unit": "c"}}\n</tool_call>\n<tool_call>{"name": "time", "arguments": {}}'
          '</tool_call>')
LLAMA = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
         '{"name": "time", "parameters": {}}')
CALLS_JSON = ('[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
              '{"name": "time", "arguments": {}}]')
MARKED = {"mistral": "[TOOL_CALLS]", "granite": "<|tool_call|>",
          "phi4_mini_json": "functools"}
PYTHONIC = '[get_weather(city="Paris", unit="c"), time()]'
WANT = [("get_weather", {"city": "Paris", "unit": "c"}), ("time", {})]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_whole():
    content, calls = get_parser("hermes").parse(HERMES)
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Paris", "unit": "c"}), ("time", {})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert calls[0].to_openai()["type"] == "function"
    # no call, broken JSON, unterminated tag: all content, nothing dropped
    assert get_parser("hermes").parse("plain answer") == ("plain answer", [])
    broken = "x <tool_call>{not json}</tool_call> y"
    assert get_parser("hermes").parse(broken) == (broken, [])
    open_tag = "a <tool_call>{\"name\": \"f\""
    assert get_parser("hermes").parse(open_tag) == (open_tag, [])


def test_llama3_whole():
    content, calls = get_parser("llama3_json").parse(LLAMA)
    assert content is None
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("time", {})]
    assert get_parser("llama3_json").parse("The answer is 4.") == ("The answer is 4.", [])
    assert get_parser("llama3_json").parse('{"not": "a call"}') == ('{"not": "a call"}', [])
    _, args_text = get_parser("llama3_json").parse(
        '{"name": "f", "parameters": "{\\"a\\": 1}"}')
    assert _calls(args_text) == [("f", {"a": 1})]


@pytest.mark.parametrize("name", sorted(MARKED))
def test_marker_json_list_whole(name):
    parser = get_parser(name)
    marker = MARKED[name]
    content, calls = parser.parse("Checking. " + marker + CALLS_JSON)
    assert content == "Checking." and _calls(calls) == WANT
    content, calls = get_parser(name).parse(marker + CALLS_JSON)
    assert content is None and _calls(calls) == WANT
    one = get_parser(name).parse(marker + '{"name": "f", "parameters": {"a": 1}}')
    assert _calls(one[1]) == [("f", {"a": 1})]
    # no marker, broken JSON after it, a list of non-calls: all content
    for text in ("plain answer", marker + "[{not json", marker + '[{"x": 1}]',
                 marker + "[]"):
        assert get_parser(name).parse(text) == (text, [])


def test_pythonic_whole():
    parser = get_parser("pythonic")
    assert parser.parse(PYTHONIC)[0] is None
    assert _calls(parser.parse(PYTHONIC)[1]) == WANT
    wrapped = "<|python_start|>" + PYTHONIC + "<|python_end|>"
    assert _calls(get_parser("pythonic").parse(wrapped)[1]) == WANT
    nested = '[f(a=[1, 2.5, None, True], b={"k": "v"}, c=-3)]'
    assert _calls(get_parser("pythonic").parse(nested)[1]) == \
        [("f", {"a": [1, 2.5, None, True], "b": {"k": "v"}, "c": -3})]
    # never evaluated: calls as argument values, positional args, **kw, non-literals,
    # non-JSON literals, plain text: all content
    for text in ("[f(a=g())]", "[f(1)]", "[f(**k)]", "[f(a=x)]", "[f(a={1, 2})]",
                 "[__import__(name='os')", "The answer is [4].", "[]", "[1, 2]",
                 "[f(a=1), 2]"):
        assert get_parser("pythonic").parse(text) == (text, []), text


@settings(max_examples=40, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("name,text", [("hermes", HERMES), ("llama3_json", LLAMA),
                                       ("hermes", "no <tool_ call here> <tool"),
                                       ("llama3_json", "plain text {not json"),
                                       ("mistral", "Sure. [TOOL_CALLS]" + CALLS_JSON),
                                       ("granite", "<|tool_call|>" + CALLS_JSON),
                                       ("phi4_mini_json", "functools" + CALLS_JSON),
                                       ("mistral", "text [TOOL_ and [TOOL_CALLS][{bad"),
                                       ("pythonic", PYTHONIC),
                                       ("pythonic", "<|python_start|>" + PYTHONIC
                                        + "<|python_end|>"),
                                       ("pythonic", "Plain [text] f(a=1)")])
def test_streaming_equals_whole(name, text, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    parser = get_parser(name)
    content, calls = "", []
    for i, piece in enumerate(pieces):
        c, done = parser.stream(piece, final=i == len(pieces) - 1)
        content += c
        calls += done
    whole_content, whole_calls = get_parser(name).parse(text)
    assert _calls(calls) == _calls(whole_calls)
    if whole_calls:
        assert content.strip() == (whole_content or "")
    else:
        assert content == text


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("name,text", [
    ("hermes", HERMES.replace("check.\n", "check. \n")),
    ("hermes", "A <tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>  B  "),
    ("hermes", "Just text, trailing space  "),
    ("mistral", "Sure.   [TOOL_CALLS]" + CALLS_JSON)])
def test_tool_stream_content_equals_the_whole_split(name, text, data):
    """What a streamed chat choice sends as content equals the unstreamed message's
    content, whatever the chunking: whitespace before a call is held back, not sent."""
    from minikernels.server.tools import ToolMode

    mode = ToolMode("auto", parser=name)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    stream = mode.stream()
    content = ""
    for i, piece in enumerate(pieces):
        content += stream.feed(piece, final=i == len(pieces) - 1)[0]
    whole, calls = mode.split(text)
    assert content == (whole or ""), (pieces, content, whole)
    assert stream.num_calls == len(calls)


def test_cli_choices_are_the_parsers():
    from minikernels.server.settings import TOOL_CALL_PARSERS
    from minikernels.server.tool_parsers import PARSERS

    assert sorted(TOOL_CALL_PARSERS) == sorted(PARSERS)


def test_unknown_parser():
    with pytest.raises(ValueError, match="unknown tool call parser 'x'"):
        get_parser("x")
