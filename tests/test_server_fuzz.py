"""Property test: whatever a client sends to any route, the server never answers 5xx,
every error is OpenAI-shaped, and it keeps serving (fake engine, bounded examples)."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minikernels.server import create_app
from minikernels.server.testing import LiveServer
from test_server_fake import API_KEY, MODEL, FakeEngine

ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
          "/detokenize", "/v1/embeddings",
          "/v1/models", f"/v1/models/{MODEL}", "/v1/models/nope", "/health", "/metrics",
          "/version", "/v1/nothing", "/",
          # sleep mode (on here; the fake engine has none: 400s past the argument checks)
          "/sleep?level=2", "/sleep?level=x&level=1", "/wake_up?tags=gpu", "/is_sleeping",
          "/reset_prefix_cache", "/update_weights_from_disk"]
METHODS = ["POST", "POST", "POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n",
          "stream", "stream_options", "temperature", "top_p", "top_k", "min_p", "stop",
          "seed", "logprobs", "top_logprobs", "echo", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids",
          "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
          "truncate_prompt_tokens", "priority", "cache_salt", "response_format", "tools",
          "tool_choice", "parallel_tool_calls", "structured_outputs", "functions",
          "chat_template_kwargs", "add_generation_prompt", "best_of", "suffix", "logit_bias",
          "user", "tokens", "add_special_tokens", "return_token_strs", "input",
          "instructions", "max_output_tokens", "text", "store", "previous_response_id",
          "include", "truncation", "reasoning", "metadata", "background", "bad_words",
          "return_tokens_as_token_ids", "prompt_logprobs", "unknown_field"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(-2 ** 70, 2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb", "<|im_end|>", MODEL, "true", "4", "text"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"])},
    optional={"content": st.one_of(st.text(max_size=20), json_values),
              "name": st.text(max_size=5), "tool_calls": json_values}), max_size=3)
plausible = {
    "model": st.sampled_from([MODEL, MODEL, "nope", "\ud800", "m\udc00"]),
    "prompt": st.one_of(st.text(max_size=20), st.lists(st.integers(-1, 200), max_size=5),
                        st.lists(st.text(max_size=5), max_size=3)),
    "messages": messages,
    "tokens": st.lists(st.one_of(st.integers(-2, 140), st.integers(-2 ** 70, 2 ** 70)),
                       max_size=6),
    "max_tokens": st.integers(-1, 40), "n": st.integers(0, 3), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 25)),
    "tools": st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "function", "x"]),
         "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "", "<|im_end|>"])},
                                           optional={"parameters": json_values})}),
        max_size=3),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required", "any"]),
                             st.fixed_dictionaries({"type": st.just("function"), "function":
                                                    st.fixed_dictionaries(
                                                        {"name": st.sampled_from(["f", "h"])})})),
    "structured_outputs": st.fixed_dictionaries({}, optional={
        "regex": st.text(max_size=6), "choice": json_values, "json": json_values}),
    # /v1/responses: a string, or items (messages, function calls and their outputs)
    "input": st.one_of(st.text(max_size=20), st.lists(st.one_of(
        st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["message", "function_call", "function_call_output",
                                     "reasoning", "x"]),
            "role": st.sampled_from(["user", "assistant", "developer", "tool"]),
            "content": st.one_of(st.text(max_size=10), st.lists(st.fixed_dictionaries(
                {"type": st.sampled_from(["input_text", "output_text", "input_image"])},
                optional={"text": json_values}), max_size=2), json_values),
            "call_id": json_values, "name": json_values, "arguments": json_values,
            "output": json_values}),
        json_values), max_size=3)),
    "max_output_tokens": st.integers(-1, 40),
    "text": st.fixed_dictionaries({}, optional={"format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object",
                                                        "json_schema", "x"])},
                              optional={"name": json_values, "schema": json_values,
                                        "strict": json_values}), json_values)}),
}
bodies = st.fixed_dictionaries({}, optional={
    f: st.one_of(plausible.get(f, json_values), json_values) for f in FIELDS})


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine(max_model_len=64, step_s=0.0)
    with LiveServer(create_app(engine, api_key=API_KEY, served_model_name=MODEL,
                               tool_call_parser="hermes", enable_sleep_mode=True)) as srv:
        yield srv


@st.composite
def requests(draw):
    if draw(st.integers(0, 9)) < 8:      # mostly well-formed calls to the generation routes
        method = "POST"
        path = draw(st.sampled_from(ROUTES[:3] * 3 + ROUTES[3:6]))
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    else:
        method = draw(st.sampled_from(METHODS))
        path = draw(st.sampled_from(ROUTES))
        headers = {"Authorization": f"Bearer {draw(st.sampled_from([API_KEY, 'no']))}",
                   "Content-Type": draw(st.sampled_from(
                       ["application/json", "application/json; charset=utf-8",
                        "text/plain", "application/x-www-form-urlencoded"]))}
    kind = draw(st.sampled_from(["json", "json", "json", "raw", "any", "deep"]))
    if kind == "deep":
        depth = draw(st.sampled_from([1, 8, 40, 1000, 5000]))
        content = (b'{"model": "%s", "prompt": ' % MODEL.encode() + b"[" * depth
                   + b"]" * depth + b"}")
    elif kind == "json":
        content = json.dumps(draw(bodies)).encode()
    elif kind == "any":
        content = json.dumps(draw(json_values)).encode()
    else:
        content = draw(st.binary(max_size=64))
    return method, path, headers, content


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400 and r.request.method != "HEAD":
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["message"], str) and err["message"]


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=requests())
def test_no_route_answers_5xx(server, req):
    method, path, headers, content = req
    r = httpx.request(method, server.base_url + path, headers=headers, content=content,
                      timeout=30)
    _check(r)


def test_still_serving_after_fuzzing(server):
    r = httpx.post(server.base_url + "/v1/completions", timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"
