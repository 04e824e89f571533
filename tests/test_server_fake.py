"""HTTP-layer tests of the OpenAI-compatible server against a fake engine.

The fake implements the AsyncLLM interface (generate / abort / stats / tokenizer) with a
character-level "model" that emits a, b, c, ... one token per step, and tracks KV blocks
per request so the tests can check that disconnects and errors free everything. The
real-engine counterpart is tests/test_server_engine.py.
"""
from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest

from minikernels.engine import (CompletionOutput, EngineOverloaded, Logprob, RequestOutput,
                                SamplingParams)
from minikernels.server import create_app
from minikernels.server.testing import LiveServer

API_KEY = "test-key"
MODEL = "fake-model"
BLOCK = 4


class CharTokenizer:
    """Token id = code point (ASCII); 0 is EOS."""

    eos_token_ids = [0]
    vocab_size = 128

    def __len__(self) -> int:
        return 128

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [min(ord(ch), 127) for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != 0 or not skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw) -> list[int]:
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"role {m['role']} not supported by this template")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


class FakeEngine:
    """Implements the AsyncLLM interface the server drives; one output token per step."""

    def __init__(self, max_model_len: int = 256, max_queue: int = 1024,
                 step_s: float = 0.002, num_blocks: int = 100000) -> None:
        self.tokenizer = CharTokenizer()
        self.model_name = "/models/fake"
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.step_s = step_s
        self.kv_blocks_total = num_blocks
        self.blocks: dict[str, int] = {}          # request id -> blocks held
        self.aborted: set[str] = set()
        self.finished: dict[str, str] = {}        # request id -> finish reason
        self.seen_params: dict[str, SamplingParams] = {}
        self.gen_tokens = 0
        self.prompt_tokens = 0

    def stats(self) -> dict:
        used = sum(self.blocks.values())
        return {"num_running": len(self.blocks), "num_waiting": 0,
                "kv_usage": used / self.kv_blocks_total,
                "kv_blocks_free": self.kv_blocks_total - used,
                "kv_blocks_total": self.kv_blocks_total,
                "prompt_tokens_total": self.prompt_tokens,
                "generation_tokens_total": self.gen_tokens, "tokens_per_s": 123.0}

    async def abort(self, request_id: str) -> None:
        await asyncio.sleep(0.3)
        self.aborted.add(request_id)
        self.blocks.pop(request_id, None)

    async def generate(self, prompt, params: SamplingParams, request_id: str):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
            raise ValueError("prompt token id outside the vocabulary")
        if len(self.blocks) >= self.max_queue:
            raise EngineOverloaded(f"queue full ({self.max_queue})")
        if len(ids) + (params.max_tokens or 0) > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"> max_model_len ({self.max_model_len})")
        self.seen_params[request_id] = params
        self.prompt_tokens += len(ids)
        self.blocks[request_id] = math.ceil(len(ids) / BLOCK)
        n = params.n
        offsets = [((params.seed or 0) + i) % 26 if params.temperature > 0 else 0
                   for i in range(n)]
        out_ids: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[dict]] = [[] for _ in range(n)]
        texts = [""] * n
        reasons: list = [None] * n

        def snapshot() -> RequestOutput:
            outs = [CompletionOutput(i, texts[i], list(out_ids[i]), None,
                                     list(lps[i]) if params.logprobs is not None else None,
                                     reasons[i]) for i in range(n)]
            return RequestOutput(request_id, prompt if isinstance(prompt, str) else None,
                                 ids, outs, all(r is not None for r in reasons))

        try:
            while any(r is None for r in reasons):
                await asyncio.sleep(self.step_s)
                if request_id in self.aborted:
                    reasons = [r or "abort" for r in reasons]
                    yield snapshot()
                    break
                for i in range(n):
                    if reasons[i] is not None:
                        continue
                    tok = ord("a") + (len(out_ids[i]) + offsets[i]) % 26
                    out_ids[i].append(tok)
                    self.gen_tokens += 1
                    if params.logprobs is not None:
                        d = {tok: Logprob(-0.25, 1, chr(tok))}
                        for r in range(params.logprobs):
                            alt = ord("A") + r
                            d.setdefault(alt, Logprob(-2.0 - r, r + 2, chr(alt)))
                        lps[i].append(d)
                    texts[i] = self.tokenizer.decode(out_ids[i])
                    for stop in params.stop_strings:
                        if stop in texts[i]:
                            texts[i] = texts[i][:texts[i].index(stop)]
                            reasons[i] = "stop"
                    if reasons[i] is None and len(out_ids[i]) >= params.max_tokens:
                        reasons[i] = "length"
                self.blocks[request_id] = math.ceil(
                    (len(ids) + sum(len(o) for o in out_ids)) / BLOCK)
                yield snapshot()
        finally:
            self.finished[request_id] = ",".join(r or "abort" for r in reasons)
            self.blocks.pop(request_id, None)


@pytest.fixture(scope="module")
def engine():
    return FakeEngine()


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, api_key=API_KEY, served_model_name=MODEL)
    with LiveServer(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=30)


def _auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def _wait_idle(engine: FakeEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.blocks == {}, f"KV blocks still held: {engine.blocks}"


def _sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ------------------------------------------------------------------- basic routes


def test_models_health_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(server.base_url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(server.base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "minikernels_num_requests_running" in r.text
    assert "minikernels_kv_cache_usage_ratio" in r.text


def test_auth_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.base_url + "/v1/completions", headers=headers,
                       json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# -------------------------------------------------------------------- completions


def test_completion(client, engine):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == "abcde"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == 10
    params = engine.seen_params[r.id + "-0"]
    assert params.max_tokens == 5 and params.temperature == 0


def test_completion_sampling_fields_mapped(client, engine):
    r = client.completions.create(
        model=MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0.7, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=-0.5,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
                    "ignore_eos": True, "stop_token_ids": [7]})
    p = engine.seen_params[r.id + "-0"]
    assert (p.temperature, p.top_p, p.seed, p.top_k, p.min_p) == (0.7, 0.9, 3, 5, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.ignore_eos and p.stop_token_ids == [7]
    assert r.usage.prompt_tokens == 3
    assert r.choices[0].text == "def"    # seed 3 shifts the fake's alphabet


def test_completion_batch_prompts_and_n(client):
    r = client.completions.create(model=MODEL, prompt=["ab", "cde"], max_tokens=2, n=2,
                                  temperature=1.0, seed=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == ["ab", "bc", "ab", "bc"]   # seed + i per choice
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8


def test_completion_stop_and_echo(client):
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=10, stop=["e", "zz"])
    assert r.choices[0].text == "abcd" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True)
    assert r.choices[0].text == "xab"


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c"]
    assert lp.token_logprobs == [-0.25] * 3
    assert lp.top_logprobs[0] == {"a": -0.25, "A": -2.0}
    assert lp.text_offset == [0, 1, 2]


def test_completion_stream_with_usage(client, server):
    stream = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "abcdef"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == 2
    # raw wire format: data: lines ending with [DONE]
    r = httpx.post(server.base_url + "/v1/completions", headers=_auth(),
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events) == "abc"
    assert all("usage" not in e for e in events)


# --------------------------------------------------------------------------- chat


def test_chat(client, engine):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hi"}],
        max_completion_tokens=4)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "abcd"
    expected = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert r.usage.prompt_tokens == len(expected)
    assert r.usage.completion_tokens == 4


def test_chat_default_max_tokens_fills_context(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    p = engine.seen_params[r.id + "-0"]
    n_prompt = r.usage.prompt_tokens
    assert p.max_tokens == engine.max_model_len - n_prompt
    assert r.usage.completion_tokens == p.max_tokens


def test_chat_stream_logprobs_and_parts(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_tokens=5, stream=True, stream_options={"include_usage": True}, logprobs=True,
        top_logprobs=1, stop="d")
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "abc"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop" and finals.count("stop") == 1
    toks = [t for c in chunks if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.content]
    assert [t.token for t in toks][:3] == ["a", "b", "c"]
    assert toks[0].top_logprobs[0].token == "a"
    assert chunks[-1].usage.completion_tokens == 4   # the stop token "d" was generated


def test_chat_n_stream(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], n=3, max_tokens=3,
        temperature=1.0, seed=1, stream=True, stream_options={"include_usage": True})
    texts = {0: "", 1: "", 2: ""}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
        if not c.choices:
            assert c.usage.completion_tokens == 9
    assert texts == {0: "bcd", 1: "cde", 2: "def"}


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop"),
    ({"model": MODEL, "prompt": "x", "logprobs": 99}, "logprobs"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": [True, False]}, "prompt"),
    ({"model": MODEL, "prompt": [[1], [2.5]]}, "prompt"),
    ({"model": MODEL, "prompt": "x", "seed": 2 ** 64}, "seed"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10000}, "max_tokens"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10000, "stream": True}, "max_tokens"),
])
def test_bad_completion_requests_400(server, body, param):
    r = httpx.post(server.base_url + "/v1/completions", headers=_auth(), json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param


@pytest.mark.parametrize("body", [
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
    {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},   # template rejects
    {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000},
    {"model": MODEL, "messages": [{"role": "user", "content": "x" * 300}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
     "response_format": {"type": "json_object"}},
    {"model": MODEL, "messages": "hello"},
])
def test_bad_chat_requests_400(server, body):
    r = httpx.post(server.base_url + "/v1/chat/completions", headers=_auth(), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_null_fields_mean_default_and_errors_name_stream_fields(server):
    # OpenAI's optional fields are nullable; clients that send null must get the default.
    nulls = {"n": None, "stream": None, "echo": None, "logprobs": None, "max_tokens": None,
             "stop": None, "ignore_eos": None, "stream_options": None}
    r = httpx.post(server.base_url + "/v1/completions", headers=_auth(),
                   json={"model": MODEL, "prompt": "x", **nulls})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["text"]
    r = httpx.post(server.base_url + "/v1/chat/completions", headers=_auth(),
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                         "n": None, "stream": None, "logprobs": None, "max_tokens": 3,
                         "add_generation_prompt": None, "response_format": None})
    assert r.status_code == 200, r.text
    # pydantic's union labels are dropped from the error path, field names never are
    for body, param in (({"stream": "maybe"}, "stream"),
                        ({"stream": True, "stream_options": {"include_usage": "x"}},
                         "stream_options.include_usage")):
        r = httpx.post(server.base_url + "/v1/completions", headers=_auth(),
                       json={"model": MODEL, "prompt": "x", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_malformed_json_and_unknown_route(server, client):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        r = httpx.post(server.base_url + "/v1/chat/completions", content=raw,
                       headers={**_auth(), "content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(server.base_url + "/v1/nothing", headers=_auth())
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.base_url + "/v1/completions", headers=_auth())
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError) as info:    # OpenAI: 404 model_not_found
        client.completions.create(model="other", prompt="x")
    assert info.value.code == "model_not_found"
    # still serving
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices[0].text


def test_overload_429():
    engine = FakeEngine(max_queue=2, step_s=0.01)
    with LiveServer(create_app(engine, served_model_name=MODEL)) as srv:
        async def main():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=30) as http:
                reqs = [http.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                           "max_tokens": 20})
                        for _ in range(6)]
                return await asyncio.gather(*reqs)

        codes = sorted(r.status_code for r in asyncio.run(main()))
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
        _wait_idle(engine)


# ------------------------------------------------------------ concurrency / aborts


def test_64_concurrent_streams(server, engine):
    async def one(client: openai.AsyncOpenAI, i: int):
        n_tok = 4 + i % 13
        stream = await client.completions.create(
            model=MODEL, prompt="p" * (1 + i % 7), max_tokens=n_tok, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        return i, n_tok, text, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY,
                                    max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 64
    for i, n_tok, text, usage in results:
        assert len(text) == n_tok and text == "abcdefghijklmnopq"[:n_tok]
        assert usage.completion_tokens == n_tok and usage.prompt_tokens == 1 + i % 7
    _wait_idle(engine)


def _wait_aborted(engine: FakeEngine, before: set, count: int = 1,
                  timeout: float = 10.0) -> set:
    """The request ids aborted since ``before``, once there are ``count``. The server's close
    cancels the pump first (the fake's generator frees its blocks in its ``finally``)
    and calls abort after that, so blocks can be free before the abort is seen."""
    deadline = time.monotonic() + timeout
    while len(engine.aborted - before) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.aborted - before


def _disconnect_case(server, engine, path, body, read_events):
    before = set(engine.aborted)
    with httpx.Client(base_url=server.base_url, headers=_auth(), timeout=30) as http:
        with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                    if got >= read_events:
                        break
    _wait_idle(engine)
    new = _wait_aborted(engine, before)
    assert len(new) == 1, new   # one engine request (n samples)


def test_disconnects_free_blocks(server, engine):
    # 200 tokens at 50 ms a step: each request outlives its client by seconds, however
    # slowly a loaded CI machine runs the client (at 2 ms a step one could finish first)
    step_s, engine.step_s = engine.step_s, 0.05
    try:
        _disconnect_case(server, engine, "/v1/completions",
                         {"model": MODEL, "prompt": "x" * 40, "max_tokens": 200,
                          "stream": True}, 3)
        _disconnect_case(server, engine, "/v1/chat/completions",
                         {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "max_tokens": 200, "stream": True, "n": 2}, 2)
        # non-streaming request whose client gives up
        before = set(engine.aborted)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.base_url + "/v1/completions", headers=_auth(), timeout=0.3,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 200})
        _wait_idle(engine)
        assert len(_wait_aborted(engine, before)) == 1
    finally:
        engine.step_s = step_s
    metrics = httpx.get(server.base_url + "/metrics").text
    line = [ln for ln in metrics.splitlines()
            if ln.startswith("minikernels_requests_aborted_disconnect_total")][0]
    assert float(line.split()[-1]) >= 3


def test_bad_requests_mixed_with_good(server, engine):
    bad_bodies = [
        {"model": MODEL, "prompt": "x", "top_p": 0},
        {"model": MODEL, "prompt": "x", "temperature": -1},
        {"model": MODEL, "prompt": "x", "max_tokens": 100000, "stream": True},
        {"model": MODEL, "messages": [{"role": "user"}], "prompt": 3},
    ]

    async def good(http: httpx.AsyncClient, i: int):
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "ab",
                                                     "max_tokens": 3 + i % 5})
        return r.status_code, r.json()

    async def bad(http: httpx.AsyncClient, i: int):
        if i % 5 == 4:
            r = await http.post("/v1/chat/completions", content=b"{oops",
                                headers={"Content-Type": "application/json"})
        else:
            r = await http.post("/v1/completions", json=bad_bodies[i % 4])
        return r.status_code, r.json()

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, headers=_auth(),
                                     timeout=60) as http:
            tasks = []
            for i in range(24):
                tasks.append(good(http, i))
                tasks.append(bad(http, i))
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for i in range(24):
        code, body = results[2 * i]
        assert code == 200, body
        assert body["choices"][0]["text"] == "abcdefg"[:3 + i % 5]
        assert body["usage"]["completion_tokens"] == 3 + i % 5
        code, body = results[2 * i + 1]
        assert code == 400 and "error" in body
    _wait_idle(engine)


def test_metrics_counters(server, client):
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    text = httpx.get(server.base_url + "/metrics").text
    assert 'minikernels_http_requests_total{model_name="fake-model",method="POST",' \
           'path="/v1/completions",status="200"}' in text
    assert 'status="400"' in text and 'status="401"' in text
    assert 'minikernels_requests_finished_total{model_name="fake-model",' \
           'finish_reason="length"}' in text
    assert "minikernels_tokens_per_second" in text
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


# ---------------------------------------------------------------------------- CLI


def test_cli_arguments(monkeypatch):
    import argparse

    from minikernels.server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["some/model", "--port", "9001", "--dtype", "float32",
                              "--no-enable-prefix-caching", "--max-model-len", "512"])
    assert args.host == "127.0.0.1" and args.port == 9001 and args.api_key is None
    kw = cli.engine_kwargs(args)
    assert kw["dtype"] == "float32" and kw["enable_prefix_caching"] is False
    assert kw["max_model_len"] == 512 and "device" not in kw
    assert kw["kv_cache_dtype"] == "auto" and kw["block_size"] == 64
    fp8 = parser.parse_args(["some/model", "--kv-cache-dtype", "fp8", "--block-size", "24"])
    assert cli.engine_kwargs(fp8)["kv_cache_dtype"] == "fp8"
    assert cli.engine_kwargs(fp8)["block_size"] == 24
    assert "disable_hybrid_kv_cache_manager" not in kw
    one = parser.parse_args(["some/model", "--disable-hybrid-kv-cache-manager"])
    assert cli.engine_kwargs(one)["disable_hybrid_kv_cache_manager"] is True
    with pytest.raises(SystemExit):
        parser.parse_args(["some/model", "--kv-cache-dtype", "int8"])

    served = {}

    class FakeServer:
        def __init__(self, config):
            served["app"] = config.app
            served["host"], served["port"] = config.host, config.port

        def run(self):
            pass

    monkeypatch.setenv("MINIKERNELS_API_KEY", "from-env")
    monkeypatch.setattr(cli, "build_engine", lambda a: FakeEngine())

    def fake_build_server(app, host, port, **kw):
        served["app"], served["host"], served["port"] = app, host, port
        return FakeServer.__new__(FakeServer)

    monkeypatch.setattr(cli, "build_server", fake_build_server)
    assert cli.run(args) == 0
    state = served["app"].state.server
    assert state.keys.check("Bearer from-env") is not None
    assert state.served_name == "some/model"
    assert (served["host"], served["port"]) == ("127.0.0.1", 9001)
    assert state.tool_call_parser is None
    assert cli.run(parser.parse_args(["some/model", "--tool-call-parser", "hermes"])) == 0
    assert served["app"].state.server.tool_call_parser == "hermes"
    assert cli.run(parser.parse_args(["some/model", "--tool-call-parser", "pythonic",
                                      "--reasoning-parser", "qwen3"])) == 0
    assert served["app"].state.server.tool_call_parser == "pythonic"
    assert served["app"].state.server.reasoning_parser == "qwen3"
    assert not served["app"].state.server.structured_outputs_in_reasoning
    assert cli.run(parser.parse_args(["some/model", "--reasoning-parser", "qwen3",
                                      "--structured-outputs-in-reasoning"])) == 0
    assert served["app"].state.server.structured_outputs_in_reasoning
    for flag, value in (("--tool-call-parser", "bogus"), ("--reasoning-parser", "o1"),
                        ("--task", "rank")):
        with pytest.raises(SystemExit):
            parser.parse_args(["some/model", flag, value])


def test_cli_bad_model_exits_2():
    import argparse

    from minikernels.server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["/nonexistent/model", "--device", "cpu"])) == 2


def test_disconnect_before_first_token():
    """A client gone while its request waits for the first token is aborted too."""
    engine = FakeEngine(step_s=0.4)
    with LiveServer(create_app(engine, served_model_name=MODEL)) as srv:
        for stream in (False, True):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.base_url + "/v1/completions", timeout=0.15,
                           json={"model": MODEL, "prompt": "x", "max_tokens": 50,
                                 "stream": stream})
        _wait_idle(engine)
        assert len(_wait_aborted(engine, set(), count=2)) == 2
        assert all(r == "abort" for r in engine.finished.values())
