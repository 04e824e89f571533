"""The OpenAI-compatible server on the real engine: a tiny random Llama saved as a HF
checkpoint (with a byte-level BPE tokenizer and a chat template), AsyncLLM on CPU,
uvicorn on 127.0.0.1, driven by the official ``openai`` client and raw httpx.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from minikernels.engine import AsyncLLM, SamplingParams  # noqa: E402
from minikernels.server import create_app  # noqa: E402
from minikernels.server.testing import LiveServer, free_port  # noqa: E402

API_KEY = "engine-test-key"
MODEL = "tiny-llama"
MAX_LEN = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_model(path: str) -> str:
    """A 2-layer random Llama + a byte-level BPE tokenizer with a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Printable-ASCII alphabet only (byte-level names: space is "Ġ", newline "Ċ"): a random
    # model then never emits a partial UTF-8 character, so streamed and offline text agree.
    alphabet = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog",
                             "user assistant system: say hi. 0123456789"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=specials[2:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=MAX_LEN, bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


ENGINE_KW = dict(dtype="float32", device="cpu", enforce_eager=True, max_model_len=MAX_LEN,
                 block_size=16, num_kv_blocks=96, max_num_seqs=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = AsyncLLM.from_args(model_dir, max_queue=256, **ENGINE_KW)
    yield eng


@pytest.fixture(scope="module")
def reference(engine):
    """Greedy outputs from the offline LLM.generate, taken before the async loop starts."""
    chat_ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "say hi"}], add_generation_prompt=True)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = engine.llm.generate(["hello world", list(chat_ids)], p)
    return {"completion": outs[0], "chat": outs[1], "chat_ids": list(chat_ids)}


@pytest.fixture(scope="module")
def server(engine, reference):
    with LiveServer(create_app(engine, api_key=API_KEY, served_model_name=MODEL)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=60)


def _auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def _wait_all_free(engine, timeout: float = 20.0) -> dict:
    """Poll stats until nothing runs or waits and every KV block is free."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if (s["num_running"] == 0 and s["num_waiting"] == 0
                and s["kv_blocks_free"] == s["kv_blocks_total"]):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle / blocks still allocated: {s}")
        time.sleep(0.02)


def _strip_specials(text: str) -> str:
    """Logprob tokens show special tokens; the output text skips them."""
    for special in ("<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        text = text.replace(special, "")
    return text


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def test_completion_matches_offline(client, reference):
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12, **GREEDY)
    ref = reference["completion"]
    assert r.choices[0].text == ref.outputs[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 12


def test_chat_matches_offline(client, reference):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "say hi"}], max_tokens=12,
        **GREEDY)
    ref = reference["chat"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(reference["chat_ids"])
    assert r.usage.completion_tokens == 12


def test_streams_equal_non_streaming(client, server, reference):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "say hi"}], max_tokens=12,
        stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["chat"].outputs[0].text
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(reference["chat_ids"])
    r = httpx.post(server.base_url + "/v1/completions", headers=_auth(), timeout=60,
                   json={"model": MODEL, "prompt": "hello world", "max_tokens": 12,
                         "temperature": 0, "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True}})
    lines = [ln[6:] for ln in r.text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(x) for x in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == \
        reference["completion"].outputs[0].text
    assert events[-1]["usage"]["total_tokens"] == \
        len(reference["completion"].prompt_token_ids) + 12


def test_stop_string(client, reference):
    full = reference["completion"].outputs[0].text
    # a stop string that first occurs after some output: cut right before it
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2)
                if full[i:i + 2].strip() and full.find(full[i:i + 2]) == i)
    cut = full[:full.index(stop)]
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12,
                                  stop=[stop], **GREEDY)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12,
                                       stop=stop, stream=True, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_seed_logprobs_n(client):
    kw = dict(model=MODEL, prompt="the quick", max_tokens=6, temperature=1.0, seed=123,
              extra_body={"ignore_eos": True})
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]   # seeded
    assert a.choices[0].text != a.choices[1].text     # choice i samples with seed + i
    assert a.usage.completion_tokens == 12
    r = client.completions.create(model=MODEL, prompt="the quick", max_tokens=4, logprobs=3,
                                  **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs)
    assert _strip_specials("".join(lp.tokens)) == r.choices[0].text
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(top) >= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-4)


def test_errors_then_still_serving(client, server, engine):
    long_prompt = "hello world " * 200
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=10)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=MAX_LEN, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[1, 2, 10 ** 6], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", top_p=1.5)
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b"{x",
                   headers={**_auth(), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    _wait_all_free(engine)


def test_extreme_sampling_values_do_not_kill_the_engine(client, engine):
    # top_k has no upper bound in the API and top_p only > 0: a huge top_k used to
    # overflow the sampler's int64 tensor (killing the engine thread: every later request
    # 503), a top_p that rounds to 0 in fp32 masked every token (garbage token 0).
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4,
                                  temperature=0.8, seed=1, extra_body={"top_k": 2 ** 70})
    assert r.choices[0].finish_reason in ("stop", "length")
    greedy = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4,
                                       **GREEDY)
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4,
                                  temperature=1.0, top_p=1e-300,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == greedy.choices[0].text
    assert not engine.errored
    _wait_all_free(engine)


def test_overload_429(server, engine):
    saved = engine.max_queue
    engine.max_queue = 1

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, headers=_auth(),
                                     timeout=60) as http:
            return await asyncio.gather(*(
                http.post("/v1/completions", json={"model": MODEL, "prompt": "hello",
                                                   "max_tokens": 4})
                for _ in range(16)))

    try:
        for _ in range(5):   # admission races the burst: retry until one is refused
            results = asyncio.run(main())
            codes = [r.status_code for r in results]
            if 429 in codes:
                break
    finally:
        engine.max_queue = saved
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    err = next(r for r in results if r.status_code == 429).json()["error"]
    assert err["code"] == "rate_limit_exceeded"
    _wait_all_free(engine)


def test_64_concurrent_streams(server, engine):
    async def one(client: openai.AsyncOpenAI, i: int):
        n_tok = 3 + i % 10
        chat = i % 2 == 1
        if chat:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                max_tokens=n_tok, stream=True, stream_options={"include_usage": True},
                logprobs=True, extra_body={"ignore_eos": True})
        else:
            stream = await client.completions.create(
                model=MODEL, prompt="the lazy dog " * (1 + i % 4), max_tokens=n_tok,
                stream=True, stream_options={"include_usage": True}, logprobs=0,
                extra_body={"ignore_eos": True})
        text, tokens, usage, finish = "", [], None, None
        async for chunk in stream:
            for ch in chunk.choices:
                text += (ch.delta.content or "") if chat else ch.text
                if ch.logprobs is not None:
                    tokens += ([t.token for t in ch.logprobs.content or []] if chat
                               else ch.logprobs.tokens)
                finish = ch.finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return n_tok, text, tokens, usage, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY,
                                    max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(main())
    for n_tok, text, tokens, usage, finish in results:
        assert usage.completion_tokens == n_tok and finish == "length"
        assert usage.prompt_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + n_tok
        assert len(tokens) == n_tok            # every generated token streamed once
        assert _strip_specials("".join(tokens)) == text
    _wait_all_free(engine)


def _disconnect_aborts(server) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines()
                if ln.startswith("minikernels_requests_aborted_disconnect_total"))
    return float(line.split()[-1])


def test_disconnects_free_kv_blocks(server, engine):
    # Checks do not race the model's speed: a disconnect must be counted as an abort, the
    # request must not have run to max_tokens, and every block must come back.
    for path, body, n_events in [
        ("/v1/completions", {"prompt": "hello world " * 10, "max_tokens": 200}, 3),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 200, "n": 2}, 4),
    ]:
        before = engine.stats()["generation_tokens_total"]
        aborts = _disconnect_aborts(server)
        with httpx.Client(base_url=server.base_url, headers=_auth(), timeout=60) as http:
            with http.stream("POST", path, json={"model": MODEL, "stream": True,
                                                 "ignore_eos": True, **body}) as r:
                assert r.status_code == 200
                got = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got += 1
                        if got >= n_events:
                            break
        s = _wait_all_free(engine)
        assert _disconnect_aborts(server) == aborts + 1
        assert s["generation_tokens_total"] - before < 200 * body.get("n", 1), s
    # a non-streaming client that gives up long before 240 tokens could be generated
    aborts = _disconnect_aborts(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", headers=_auth(), timeout=0.1,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 240,
                         "ignore_eos": True})
    s = _wait_all_free(engine)
    assert _disconnect_aborts(server) == aborts + 1
    assert s["generation_tokens_total"] > 0


def test_disconnects_mixed_with_good_streams(server, engine):
    """Half the streams hang up after a few events; the others all finish intact."""

    async def one(http: httpx.AsyncClient, i: int):
        quit_after = 2 + i % 3 if i % 2 else None
        body = {"model": MODEL, "prompt": f"hello {i}", "max_tokens": 60 if quit_after else
                4 + i % 5, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if quit_after and len(events) >= quit_after:
                        break
        return i, quit_after, events

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, headers=_auth(),
                                     timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(24)))

    for i, quit_after, events in asyncio.run(main()):
        if quit_after:
            continue
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 4 + i % 5
    _wait_all_free(engine)


def test_bad_requests_mixed_with_good(server, engine):
    bad = [
        {"model": MODEL, "prompt": "hello world " * 200, "max_tokens": 8},     # too long
        {"model": MODEL, "prompt": "x", "top_p": 0},
        {"model": MODEL, "prompt": "x", "temperature": -1},
        {"model": MODEL, "prompt": [5, 10 ** 7]},                              # vocab
        {"model": MODEL, "prompt": "x", "max_tokens": 1000, "stream": True},
    ]

    async def good(http, i):
        r = await http.post("/v1/completions", json={
            "model": MODEL, "prompt": "hello", "max_tokens": 2 + i % 6, "ignore_eos": True,
            "temperature": 0})
        return r.status_code, r.json()

    async def bad_one(http, i):
        r = await http.post("/v1/completions", json=bad[i % len(bad)])
        return r.status_code, r.json()

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, headers=_auth(),
                                     timeout=120) as http:
            return await asyncio.gather(*(f(http, i) for i in range(20)
                                          for f in (good, bad_one)))

    results = asyncio.run(main())
    texts = set()
    for i in range(20):
        code, body = results[2 * i]
        assert code == 200, body
        assert body["usage"]["completion_tokens"] == 2 + i % 6
        texts.add(body["choices"][0]["text"][:1])
        code, body = results[2 * i + 1]
        assert code == 400 and body["error"]["type"] == "invalid_request_error", body
    _wait_all_free(engine)


def test_metrics_and_health(server, engine):
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.base_url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            values[name_labels.split("{")[0]] = float(value)
    s = engine.stats()
    assert values["minikernels_kv_blocks_total"] == s["kv_blocks_total"]
    assert values["minikernels_generation_tokens_total"] > 0
    for key in ("minikernels_num_requests_running", "minikernels_num_requests_waiting",
                "minikernels_kv_cache_usage_ratio", "minikernels_tokens_per_second",
                "minikernels_http_requests_total", "minikernels_requests_finished_total"):
        assert key in values


def test_cached_tokens_min_tokens_and_stop_str(client, server, reference):
    # the same 3-block prompt twice: the second is served from the prefix cache
    prompt = [5 + (i * 7) % 60 for i in range(40)]
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    text = httpx.get(server.base_url + "/metrics").text
    hits = next(ln for ln in text.splitlines()
                if ln.startswith("minikernels_prefix_cache_hits_tokens_total"))
    assert float(hits.split()[-1]) >= 16
    # min_tokens holds back a stop token the greedy model emits at once
    first_tok = reference["completion"].outputs[0].token_ids[0]
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8,
                                  temperature=0, extra_body={"stop_token_ids": [first_tok]})
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8,
                                  temperature=0, extra_body={"stop_token_ids": [first_tok],
                                                             "min_tokens": 4})
    assert r.usage.completion_tokens >= 4
    # include_stop_str_in_output keeps the matched stop string
    full = reference["completion"].outputs[0].text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2)
                if full[i:i + 2].strip() and full.find(full[i:i + 2]) == i)
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12,
                                  stop=[stop], extra_body={"ignore_eos": True,
                                                           "include_stop_str_in_output": True},
                                  temperature=0)
    assert r.choices[0].text == full[:full.index(stop) + len(stop)]


def test_prompt_far_beyond_the_context_is_refused_at_once(client, server):
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hello world " * 300000, max_tokens=2)
    assert info.value.code == "context_length_exceeded"
    assert time.monotonic() - t0 < 2.0
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices


def test_cli_serve_subprocess(model_dir):
    """`python -m minikernels serve` end to end: start, answer, log, and on SIGTERM end
    an open stream with a final chunk and [DONE], then exit 0 without a traceback."""
    port = free_port()
    env = {**os.environ, "MINIKERNELS_API_KEY": "cli-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minikernels", "serve", model_dir, "--port", str(port),
         "--served-model-name", "cli-model", "--dtype", "float32", "--device", "cpu",
         "--enforce-eager", "--max-model-len", "128", "--num-kv-blocks", "32",
         "--block-size", "16", "--log-level", "info", "--shutdown-grace", "0.5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.25)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key",
                               max_retries=0, timeout=60)
        assert client.models.list().data[0].id == "cli-model"
        r = client.chat.completions.create(model="cli-model", max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong",
                          max_retries=0).models.list()
        client.close()
        lines: list[str] = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          headers={"Authorization": "Bearer cli-key"},
                          json={"model": "cli-model", "prompt": "hi", "max_tokens": 120,
                                "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 2:
                        proc.send_signal(signal.SIGTERM)
    finally:
        if proc.poll() is None and not lines:
            proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=30)
            print(f"server stopped {time.monotonic() - t0:.2f}s after SIGTERM")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("server did not stop on SIGTERM")
    log = proc.stdout.read().decode()
    assert rc == 0, log
    assert lines[-1] == "[DONE]", lines[-3:]
    events = [json.loads(x) for x in lines[:-1]]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] \
        in ("abort", "length")
    assert "usage" in events[-1]
    assert "Traceback" not in log, log
    assert "max_model_len 128" in log and "KV cache 512 tokens" in log, log
    assert '"POST /v1/chat/completions" 200' in log, log


def _cached(client, prompt, **extra) -> int:
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                  extra_body={"ignore_eos": True, **extra})
    return r.usage.prompt_tokens_details.cached_tokens


def test_api_keys_and_cache_salt_keep_prefix_caches_apart(engine, server):
    # Proof by cached prompt tokens, not timing: a key never hits another key's blocks.
    keys = ["key-alice", "key-bob"]
    with LiveServer(create_app(engine, api_key=keys, served_model_name=MODEL)) as srv:
        alice, bob = (openai.OpenAI(base_url=srv.base_url + "/v1", api_key=k, max_retries=0,
                                    timeout=60) for k in keys)
        prompt = [7 + (i * 11) % 90 for i in range(40)]          # 2 full blocks of 16
        assert _cached(alice, prompt) == 0
        assert _cached(alice, prompt) == 32                     # within a key: hits
        assert _cached(bob, prompt) == 0                        # across keys: none
        assert _cached(bob, prompt) == 32
        assert _cached(alice, prompt, cache_salt="tenant-1") == 0     # the client's salt
        assert _cached(alice, prompt, cache_salt="tenant-1") == 32
        assert _cached(bob, prompt, cache_salt="tenant-1") == 0       # same salt, other key
        # The single-key server (module fixture) has its own, unsalted, cache.
        single = openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY,
                               max_retries=0, timeout=60)
        assert _cached(single, prompt) == 0
    # --shared-prefix-cache: keys share entries on purpose.
    with LiveServer(create_app(engine, api_key=keys, served_model_name=MODEL,
                               shared_prefix_cache=True)) as srv:
        alice, bob = (openai.OpenAI(base_url=srv.base_url + "/v1", api_key=k, max_retries=0,
                                    timeout=60) for k in keys)
        prompt = [9 + (i * 13) % 90 for i in range(40)]
        assert _cached(alice, prompt) == 0
        assert _cached(bob, prompt) == 32
    text = httpx.get(server.base_url + "/metrics").text
    values = {ln.split("{")[0]: float(ln.split()[-1]) for ln in text.splitlines()
              if ln and not ln.startswith("#")}
    assert values["minikernels_prefix_cache_queries_tokens_total"] >= 7 * 40
    assert values["minikernels_prefix_cache_queries_tokens_total"] >= \
        values["minikernels_prefix_cache_hits_tokens_total"] > 0
    _wait_all_free(engine)


def test_echo_with_logprobs_returns_prompt_logprobs(client, model_dir, engine):
    # What lm-eval-harness's loglikelihood reads: tokens, token_logprobs (null first),
    # top_logprobs, text_offset over prompt + output; checked against transformers.
    import torch
    from transformers import LlamaForCausalLM

    tok = engine.tokenizer
    text = "hello world, the quick brown fox"
    ids = list(tok.encode(text))
    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    # Warm the prefix cache: prompt logprobs must still be computed for every token.
    client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0)
    bodies = []
    for stream in (False, True):
        r = httpx.post(server_url(client) + "/completions", headers=_auth(), timeout=60,
                       json={"model": MODEL, "prompt": ids, "max_tokens": 1, "echo": True,
                             "logprobs": 2, "temperature": 0, "stream": stream})
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(ln[6:]) for ln in r.text.splitlines()
                      if ln.startswith("data: {")]
            lp = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
            out_text = ""
            for ch in chunks:
                for c in ch["choices"]:
                    out_text += c["text"]
                    for k in lp:
                        lp[k] += (c["logprobs"] or {}).get(k, [])
            bodies.append((out_text, lp))
        else:
            c = r.json()["choices"][0]
            bodies.append((c["text"], c["logprobs"]))
    assert bodies[0] == bodies[1]
    out_text, lp = bodies[0]
    n = len(ids)
    assert len(lp["tokens"]) == n + 1 and lp["tokens"][:n] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, n):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        top = torch.topk(ref[i - 1], 2)
        assert sorted(lp["top_logprobs"][i].values(), reverse=True) == \
            pytest.approx(top.values.tolist(), abs=1e-4)
    # text_offset runs over the echoed prompt, then the generated token
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][n] == len(out_text) - len(lp["tokens"][n])
    assert lp["token_logprobs"][n] == pytest.approx(ref[n - 1].max().item(), abs=1e-4)
    _wait_all_free(engine)


def server_url(client) -> str:
    return str(client.base_url).rstrip("/")


def test_priority_is_accepted(client):
    for priority in (-5, 0, 7):
        r = client.completions.create(model=MODEL, prompt="hello", max_tokens=2,
                                      extra_body={"priority": priority})
        assert r.choices[0].finish_reason in ("stop", "length")


def test_tokenize_and_detokenize(server, client, reference):
    """vLLM's /tokenize (prompt or chat messages: the ids the generation routes run) and
    /detokenize, behind the API key."""
    url = server.base_url
    r = httpx.post(url + "/tokenize", headers=_auth(), timeout=30,
                   json={"model": MODEL, "prompt": "hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ref_ids = list(reference["completion"].prompt_token_ids)
    assert body["tokens"] == ref_ids and body["count"] == len(ref_ids)
    assert body["max_model_len"] == MAX_LEN
    assert "".join(body["token_strs"]).replace("\u0120", " ").endswith("hello world")
    plain = httpx.post(url + "/tokenize", headers=_auth(), timeout=30,
                       json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == [t for t in ref_ids if t != 0]       # no <s>
    chat = httpx.post(url + "/tokenize", headers=_auth(), timeout=30,
                      json={"messages": [{"role": "user", "content": "say hi"}]}).json()
    assert chat["tokens"] == reference["chat_ids"]
    r = client.chat.completions.create(model=MODEL, max_tokens=1,
                                       messages=[{"role": "user", "content": "say hi"}])
    assert r.usage.prompt_tokens == chat["count"]
    d = httpx.post(url + "/detokenize", headers=_auth(), timeout=30,
                   json={"model": MODEL, "tokens": chat["tokens"]})
    assert d.status_code == 200
    assert d.json()["prompt"] == "<|im_start|>user\nsay hi<|im_end|>\n<|im_start|>assistant\n"
    # refusals: OpenAI-shaped 4xx naming the problem
    for path, payload, status, param in [
            ("/tokenize", {"prompt": "x"}, 401, None),
            ("/detokenize", {"tokens": [1, 10 ** 6]}, 400, "tokens[1]"),
            ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
            ("/tokenize", {"prompt": "x", "bogus": 1}, 400, "bogus"),
            ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
            ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                           "add_special_tokens": True}, 400, "add_special_tokens")]:
        headers = {} if status == 401 else _auth()
        r = httpx.post(url + path, headers=headers, json=payload, timeout=30)
        assert r.status_code == status, (path, payload, r.text)
        if param is not None:
            assert r.json()["error"]["param"] == param


def test_logit_bias_and_allowed_token_ids(client, server, engine):
    """OpenAI's logit_bias (string token ids) and vLLM's allowed_token_ids on the real
    engine: +100 forces a token, -100 bans the greedy choice, allowed ids bound the
    output; ids outside the vocabulary are 400s naming the key."""
    tok = engine.tokenizer
    x_id = tok.encode("x", add_special_tokens=False)[0]
    forced = client.completions.create(model=MODEL, prompt="hello world", max_tokens=5,
                                       temperature=0, logit_bias={str(x_id): 100})
    assert forced.choices[0].text == "xxxxx"
    greedy = client.completions.create(model=MODEL, prompt="hello world", max_tokens=1,
                                       temperature=0)
    first = tok.encode(greedy.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt="hello world", max_tokens=1,
                                       temperature=0, logit_bias={str(first): -100})
    assert banned.choices[0].text != greedy.choices[0].text
    allowed = tok.encode("ab", add_special_tokens=False)
    only = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "say hi"}], max_tokens=8,
        temperature=1.0, seed=3, extra_body={"allowed_token_ids": allowed})
    assert set(only.choices[0].message.content) <= {"a", "b"}
    # vLLM's bad_words: the forced "x" is banned, so the forced output cannot be "xxxxx"
    no_x = client.completions.create(model=MODEL, prompt="hello world", max_tokens=5,
                                     temperature=0, logit_bias={str(x_id): 100},
                                     extra_body={"bad_words": ["x"]})
    assert "x" not in no_x.choices[0].text
    vocab = len(tok.tokenizer)
    for body, param in (({"logit_bias": {str(vocab): 1}}, f"logit_bias.{vocab}"),
                        ({"allowed_token_ids": [1, vocab + 5]}, "allowed_token_ids[1]"),
                        ({"bad_words": ["ok", ""]}, "bad_words[1]"),
                        ({"bad_words": ["w"] * 129}, "bad_words")):
        r = httpx.post(server.base_url + "/v1/completions", headers=_auth(), timeout=30,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_return_tokens_as_token_ids(client, engine):
    """vLLM's return_tokens_as_token_ids: logprob tokens (and alternatives) are
    "token_id:<id>" strings naming the exact ids; they decode to the text; chat's bytes
    stay the tokens' own."""
    tok = engine.tokenizer
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=6,
                                  logprobs=2, temperature=0, extra_body={
                                      "ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    ids = [int(t.split(":", 1)[1]) for t in lp.tokens]
    assert all(t.startswith("token_id:") for t in lp.tokens)
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    assert tok.decode(ids, skip_special_tokens=True) == r.choices[0].text
    c = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "say hi"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    content = c.choices[0].logprobs.content
    ids = [int(e.token.split(":", 1)[1]) for e in content]
    assert tok.decode(ids, skip_special_tokens=True) == c.choices[0].message.content
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == \
        tok.decode(ids, skip_special_tokens=False)
    assert all(t.token.startswith("token_id:") for e in content for t in e.top_logprobs)


def test_prompt_logprobs_field(client, server, engine):
    """vLLM's prompt_logprobs: per prompt token (null first) the token's logprob, rank
    and decoded text plus its k best alternatives, equal to the offline engine's; on
    completions per choice, on chat once; refused with stream=true."""
    k = 2
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=3,
                                  temperature=0, extra_body={"prompt_logprobs": k})
    got = r.choices[0].model_extra["prompt_logprobs"]
    ref = engine.llm.generate(["hello world"], SamplingParams(
        temperature=0, max_tokens=1, prompt_logprobs=k), use_tqdm=False)[0]
    ids = ref.prompt_token_ids
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        row = got[i]
        assert str(ids[i]) in row and len(row) <= k + 1
        want = ref.prompt_logprobs[i][ids[i]]
        assert abs(row[str(ids[i])]["logprob"] - want.logprob) < 1e-4
        assert row[str(ids[i])]["rank"] == want.rank
    c = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0,
                                       messages=[{"role": "user", "content": "say hi"}],
                                       extra_body={"prompt_logprobs": 0})
    plp = c.model_extra["prompt_logprobs"]
    assert plp[0] is None and all(len(row) == 1 for row in plp[1:])
    bad = httpx.post(server.base_url + "/v1/completions", headers=_auth(), timeout=30, json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True, "prompt_logprobs": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"
