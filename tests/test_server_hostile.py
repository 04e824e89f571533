"""The server against a hostile client (issue 15), on the fake engine of test_server_fake.

Bad inputs get an OpenAI-shaped 4xx and the server keeps serving; stalls are checked by
a probe request answered within 1 s during the attack; between users: special tokens,
keys, Host / Origin / content type, no leaked paths or reprs; OpenAI fidelity: strict
types, every parameter honoured or refused with a 400 naming it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import openai
import pytest

from minikernels.engine import CompletionOutput, RequestOutput
from minikernels.engine.async_llm import EngineDeadError
from minikernels.server import create_app
from minikernels.server.limits import ServerLimits
from minikernels.server.testing import LiveServer
from test_server_fake import API_KEY, MODEL, CharTokenizer, FakeEngine

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMITS = ServerLimits(max_body_bytes=64 * 1024, body_timeout_s=0.6, header_timeout_s=0.6,
                      max_prompts=32)


class RecordingTokenizer(CharTokenizer):
    """CharTokenizer that records template kwargs and can be slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.encode_calls = 0
        self.template_kwargs: list[dict] = []

    def encode(self, text: str) -> list[int]:
        self.encode_calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().encode(text)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
        self.template_kwargs.append(dict(kw))
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().apply_chat_template(messages, add_generation_prompt, **kw)


@pytest.fixture(scope="module")
def engine():
    eng = FakeEngine(max_queue=64)
    eng.tokenizer = RecordingTokenizer()
    return eng


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, api_key=[API_KEY, "second-key"], served_model_name=MODEL,
                     limits=LIMITS)
    with LiveServer(app, header_timeout_s=LIMITS.header_timeout_s) as srv:
        yield srv


def post(server, path: str, body, headers=None, **kw) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers={**AUTH, **(headers or {})},
                      timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    return err


def still_serving(server) -> None:
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"


def metrics_text(server) -> str:
    return httpx.get(server.base_url + "/metrics", timeout=10).text


def raw_exchange(port: int, data: bytes, wait_s: float = 2.0) -> bytes:
    """Send raw bytes, then read until the server closes or ``wait_s`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


# ----------------------------------------------------------------- errors, not 500s


def test_deep_json_and_surrogates_are_400_on_a_kept_alive_connection(server):
    with httpx.Client(base_url=server.base_url, headers={**AUTH, "Content-Type":
                                                         "application/json"}) as http:
        deep = b'{"model": "x", "prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"
        r = http.post("/v1/completions", content=deep)
        assert_error(r, 400)
        assert r.headers.get("connection") != "close"
        r = http.post("/v1/completions", content=b'{"model": "\\ud800", "prompt": "x"}')
        assert_error(r, 400, "model")
        r = http.post("/v1/chat/completions",
                      content=b'{"model": "%s", "messages": [{"role": "user", "content": '
                              b'"a\\udfffb"}]}' % MODEL.encode())
        assert_error(r, 400, "messages[0].content")
        r = http.post("/v1/completions", content=json.dumps(
            {"model": MODEL, "prompt": "x", "max_tokens": 2}).encode())
        assert r.status_code == 200     # same connection, still serving


@pytest.mark.parametrize("raw,param", [
    (b'{"model": "fake-model", "prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"model": "fake-model", "prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"model": "fake-model", "prompt": "x", "presence_penalty": -1e400}',
     "presence_penalty"),
])
def test_non_finite_numbers_refused(server, raw, param):
    r = httpx.post(server.base_url + "/v1/completions", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"})
    err = assert_error(r, 400, param)
    assert "is not allowed" in err["message"]
    if b"NaN" in raw:
        assert "NaN is not allowed" in err["message"]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "4"), ("max_tokens", 4.0), ("max_tokens", True), ("stream", "true"),
    ("stream", 1), ("n", True), ("temperature", "0.5"), ("echo", 1), ("logprobs", True),
    ("seed", "1"), ("stop", 5), ("ignore_eos", "yes"), ("min_tokens", 1.5),
])
def test_wrong_json_types_are_refused_not_coerced(server, field, value):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", field: value})
    assert_error(r, 400, field)


@pytest.mark.parametrize("body,param", [
    ({"priority": 2 ** 63}, "priority"),
    ({"priority": 1.5}, "priority"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"tool_choice": "auto"}, "tool_choice"),          # no tools
    ({"tool_choice": "sometimes", "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]},
     "tools[0].function.x"),
    ({"response_format": {}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    # the fake engine has no grammar compiler: constraints are refused by name
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias.x"),
    ({"logit_bias": {"-5": 1.0}}, "logit_bias.-5"),
    ({"logit_bias": {"5": 500.0}}, "logit_bias.5"),
    ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"repetition_penalty": 1e-50}, "repetition_penalty"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]},
     "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "1", "type": "function"}]}]},
     "messages[1].tool_calls[0].function"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "1", "type": "function",
                        "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "surprise": 1}]},
     "messages[0].surprise"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_unsupported_chat_parameters_refused_by_name(server, body, param):
    full = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            **body}
    assert_error(post(server, "/v1/chat/completions", full), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"suffix": "x"}, "suffix"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 100000}, "truncate_prompt_tokens"),
    ({"stream_options": {"include_usage": True, "continuous": 1}, "stream": True},
     "stream_options.continuous"),
])
def test_unsupported_completion_parameters_refused_by_name(server, body, param):
    full = {"model": MODEL, "prompt": "hi", "max_tokens": 3, **body}
    assert_error(post(server, "/v1/completions", full), 400, param)
    still_serving(server)


def test_vllm_parameters_reach_the_engine(server, engine):
    r = post(server, "/v1/completions", {
        "model": MODEL, "prompt": "abcdefgh", "max_tokens": 3, "min_tokens": 2,
        "include_stop_str_in_output": True, "skip_special_tokens": False,
        "truncate_prompt_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    p = engine.seen_params[body["id"] + "-0"]
    assert (p.min_tokens, p.include_stop_str_in_output, p.skip_special_tokens) == \
        (2, True, False)
    assert body["usage"]["prompt_tokens"] == 3          # the last 3 tokens were kept
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    r = post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    assert engine.tokenizer.template_kwargs[-1] == {"enable_thinking": False}


def test_priority_cache_salt_and_prompt_logprobs_reach_the_engine(server, engine):
    from minikernels.engine.sampling_params import RequestOutputKind
    from minikernels.server.auth import key_id

    salts = {}
    for key in (API_KEY, "second-key"):
        for client_salt in (None, "s1"):
            body = {"model": MODEL, "prompt": "abcdefgh", "max_tokens": 2, "priority": -3}
            if client_salt is not None:
                body["cache_salt"] = client_salt
            r = post(server, "/v1/completions", body,
                     headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            p = engine.seen_params[r.json()["id"] + "-0"]
            assert p.priority == -3 and p.prompt_logprobs is None
            salts[key, client_salt] = p.cache_salt
    # Two keys: each key's prefix cache is salted apart; a client salt salts further.
    assert len(set(salts.values())) == 4 and None not in salts.values()
    assert key_id(API_KEY) in salts[API_KEY, None]
    # echo + logprobs asks the engine for prompt logprobs (taken from the final output)
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 2,
                                         "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    p = engine.seen_params[r.json()["id"] + "-0"]
    assert p.prompt_logprobs == 2 and p.output_kind is RequestOutputKind.FINAL_ONLY
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"][:3] == ["a", "b", "c"] and lp["token_logprobs"][0] is None
    assert lp["text_offset"] == [0, 1, 2, 3, 4] and r.json()["choices"][0]["text"] == "abcab"


def test_one_key_no_salt_unless_the_client_sends_one():
    eng = FakeEngine()
    app = create_app(eng, api_key=API_KEY, served_model_name=MODEL)
    with LiveServer(app) as srv:
        ids = []
        for body in ({}, {"cache_salt": "mine"}):
            r = post(srv, "/v1/completions", {"model": MODEL, "prompt": "x",
                                              "max_tokens": 1, **body})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"] + "-0")
    assert eng.seen_params[ids[0]].cache_salt is None
    assert "mine" in eng.seen_params[ids[1]].cache_salt


def test_chat_echo_prefixes_the_last_assistant_message(server):
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Sure: "}]
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": msgs,
                                             "max_tokens": 2, "echo": True,
                                             "add_generation_prompt": False})
    assert r.json()["choices"][0]["message"]["content"] == "Sure: ab"


def test_client_disconnect_mid_body_is_not_a_500(server, caplog):
    before = metrics_text(server).count('status="500"')
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            f"{API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n")
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(head.encode() + b'{"model": "fake-')
            time.sleep(0.05)
        time.sleep(0.3)
    assert metrics_text(server).count('status="500"') == before
    assert not [r for r in caplog.records if "Traceback" in r.getMessage()
                or r.exc_info is not None]
    still_serving(server)


# ---------------------------------------------------------------------------- stalls


def _probe_during(server, attack, timeout: float = 1.0) -> float:
    """Run ``attack`` in a thread; return how long /health took meanwhile."""
    t = threading.Thread(target=attack, daemon=True)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    r = httpx.get(server.base_url + "/health", timeout=5)
    took = time.monotonic() - t0
    assert r.status_code == 200
    t.join(30)
    assert took < timeout, f"/health took {took:.2f}s during the attack"
    return took


def test_tokenization_runs_off_the_event_loop():
    engine = FakeEngine()
    engine.tokenizer = RecordingTokenizer(delay_s=2.0)
    with LiveServer(create_app(engine, served_model_name=MODEL)) as srv:
        results = []
        _probe_during(srv, lambda: results.append(httpx.post(
            srv.base_url + "/v1/completions", timeout=30,
            json={"model": MODEL, "prompt": "hello", "max_tokens": 2})))
        assert results[0].status_code == 200


def test_oversized_prompt_refused_before_tokenizing(server, engine):
    calls = engine.tokenizer.encode_calls
    # 60 KB fits the body limit but can never fit 256 tokens of <= 64 characters each.
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 60000})
    err = assert_error(r, 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    assert engine.tokenizer.encode_calls == calls
    r = post(server, "/v1/chat/completions",
             {"model": MODEL, "messages": [{"role": "user", "content": "x" * 60000}]})
    assert_error(r, 400, "messages")


def test_body_size_limit(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 70000})
    assert_error(r, 413)

    def chunks():
        yield b'{"model": "fake-model", "prompt": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    r = httpx.post(server.base_url + "/v1/completions", content=chunks(), timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 413)
    still_serving(server)


def test_prompt_count_cap_is_400_not_429(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 33})
    assert_error(r, 400, "prompt")
    engine = FakeEngine(max_queue=4)
    with LiveServer(create_app(engine, served_model_name=MODEL)) as srv:
        r = httpx.post(srv.base_url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": ["a"] * 5, "max_tokens": 1})
        assert_error(r, 400, "prompt")
        assert "retry-after" not in r.headers


def test_slow_headers_and_bodies_are_cut_off(server):
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    idle = socket.create_connection(("127.0.0.1", server.port))   # says nothing at all
    socks.append(idle)
    t0 = time.monotonic()
    r = httpx.get(server.base_url + "/health", timeout=5)
    assert r.status_code == 200 and time.monotonic() - t0 < 1.0
    time.sleep(LIMITS.header_timeout_s + 0.6)
    for s in socks:
        s.settimeout(2)
        assert s.recv(100) == b"", "a connection trickling its headers was left open"
        s.close()
    # headers complete, body trickled: 408 in OpenAI's shape, then closed
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            f"{API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    out = raw_exchange(server.port, head.encode() + b'{"model"', wait_s=3)
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert b'"code":"request_timeout"' in out
    still_serving(server)


def test_made_up_methods_do_not_grow_metric_labels(server):
    for method in ("FOO", "BAR", "BAZ123"):
        httpx.request(method, server.base_url + "/v1/completions", headers=AUTH)
    text = metrics_text(server)
    assert 'method="FOO"' not in text and 'method="BAR"' not in text
    assert 'method="other"' in text


# ------------------------------------------------------------------- between users


def test_several_api_keys(server):
    for key in (API_KEY, "second-key"):
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)
        assert c.models.list().data[0].id == MODEL
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="third",
                      max_retries=0).models.list()


def test_api_key_file_and_repeated_flag(tmp_path):
    from minikernels.server.auth import collect_keys

    f = tmp_path / "keys"
    f.write_text("# operators\nalpha\n\n beta \n")
    assert collect_keys(["one", "two"], str(f), env={}) == ["one", "two", "alpha", "beta"]
    assert collect_keys(None, None, env={"MINIKERNELS_API_KEY": "env"}) == ["env"]
    assert collect_keys(None, None, env={}) == []


def test_non_json_content_types_refused(server):
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                  None):
        headers = dict(AUTH)
        if ctype:
            headers["Content-Type"] = ctype
        r = httpx.post(server.base_url + "/v1/completions", content=body, headers=headers)
        assert_error(r, 415)
    still_serving(server)


def test_host_and_origin_checks_and_no_cors(server):
    r = httpx.get(server.base_url + "/v1/models", headers={**AUTH, "Host": "evil.example"})
    assert assert_error(r, 400)["code"] == "invalid_host"
    r = httpx.get(server.base_url + "/health", headers={"Host": "localhost:1234"})
    assert r.status_code == 200
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x"},
             headers={"Origin": "http://evil.example"})
    assert_error(r, 403)
    r = httpx.options(server.base_url + "/v1/completions",
                      headers={"Origin": "http://evil.example",
                               "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code >= 400


def test_no_paths_in_models_and_no_reprs_in_503():
    engine = FakeEngine()   # its model_name is the path "/models/fake"
    with LiveServer(create_app(engine, served_model_name=MODEL)) as srv:
        r = httpx.get(srv.base_url + "/v1/models")
        assert "/models/fake" not in r.text and r.json()["data"][0]["root"] == MODEL

        async def dead(*a, **kw):
            raise EngineDeadError("the engine loop stopped on an error: "
                                  "RuntimeError('<secret object at 0x7f00>')")
            yield  # pragma: no cover

        engine.generate = dead
        r = httpx.post(srv.base_url + "/v1/completions",
                       json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        err = assert_error(r, 503)
        assert "0x7f00" not in r.text and "RuntimeError" not in err["message"]


def test_access_log_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="minikernels.access"):
        httpx.get(server.base_url + "/health")
        post(server, "/v1/completions", {"model": "nope", "prompt": "x"})
        time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "minikernels.access"]
    assert any('"GET /health" 200' in ln and ln.endswith("ms") for ln in lines), lines
    assert any('"POST /v1/completions" 404' in ln for ln in lines), lines


# ------------------------------------------------------------------------ streaming


class HoldBackEngine(FakeEngine):
    """Every other step adds a token but no text (a partial character held back)."""

    async def generate(self, prompt, params, request_id):
        ids = list(prompt)
        toks: list[int] = []
        for step in range(6):
            await asyncio.sleep(0.002)
            toks.append(97 + step)
            text = "".join(chr(t) for t in toks[: len(toks) // 2 * 2])
            done = step == 5
            yield RequestOutput(request_id, None, ids, [CompletionOutput(
                0, text, list(toks), None, None, "length" if done else None)], done,
                num_cached_tokens=2)


def test_no_empty_stream_chunks_and_cached_tokens():
    engine = HoldBackEngine()
    with LiveServer(create_app(engine, served_model_name=MODEL)) as srv:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user",
                                                                   "content": "x"}]}),
                           ("/v1/completions", {"prompt": "hello"})):
            r = httpx.post(srv.base_url + path, timeout=30, json={
                "model": MODEL, "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}, **body})
            events = [json.loads(ln[6:]) for ln in r.text.split("\n")
                      if ln.startswith("data: ") and ln != "data: [DONE]"]
            chunks = [e["choices"][0] for e in events if e["choices"]]
            for ch in chunks[1:-1] if "messages" in body else chunks[:-1]:
                content = ch["delta"].get("content") if "delta" in ch else ch["text"]
                assert content, f"empty chunk while text was held back: {ch}"
            assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


def test_graceful_shutdown_ends_streams_with_done():
    engine = FakeEngine(step_s=0.02)
    srv = LiveServer(create_app(engine, served_model_name=MODEL), drain_s=0.3).start()
    lines: list[str] = []

    def read():
        with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "x", "max_tokens": 200,
                                "stream": True, "stream_options": {"include_usage": True}}) \
                as r:
            for ln in r.iter_lines():
                if ln.startswith("data: "):
                    lines.append(ln[6:])

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.3)
    srv.stop()
    t.join(10)
    assert lines[-1] == "[DONE]", lines[-3:]
    final = [json.loads(x) for x in lines[:-1]]
    assert final[-2]["choices"][0]["finish_reason"] == "abort"
    assert final[-1]["usage"]["completion_tokens"] < 200
    assert engine.blocks == {}
