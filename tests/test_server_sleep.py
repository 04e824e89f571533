"""Sleep mode over HTTP (server/sleep_routes.py): /sleep, /wake_up, /is_sleeping and
/reset_prefix_cache behind --enable-sleep-mode and the API key; a sleep issued while a
stream runs waits for it (the stream completes whole); generation while asleep is a 503
``engine_sleeping``; after waking, the same greedy tokens; bad levels / tags are 400s."""
from __future__ import annotations

import threading

import httpx
import pytest

from minikernels.engine import AsyncLLM, SamplingParams
from minikernels.server import create_app
from minikernels.server.testing import LiveServer

KEY = "sleepy"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine():
    return AsyncLLM.from_args("tiny", dtype="float32", device="cpu", num_kv_blocks=64,
                              block_size=16)


def _complete(url: str, max_tokens: int = 5, stream: bool = False) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)


def test_routes_are_off_by_default(engine):
    with LiveServer(create_app(engine, api_key=KEY, served_model_name="tiny")) as srv:
        r = httpx.post(srv.base_url + "/sleep", headers=AUTH, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_sleep_wake_over_http(engine):
    want = engine.llm.generate(["hello there"], SamplingParams(
        temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    app = create_app(engine, api_key=KEY, served_model_name="tiny", enable_sleep_mode=True)
    with LiveServer(app) as srv:
        url = srv.base_url
        assert httpx.post(url + "/sleep", timeout=30).status_code == 401
        assert httpx.get(url + "/is_sleeping", headers=AUTH, timeout=30).json() == \
            {"is_sleeping": False}
        # a long stream, then /sleep while it runs: the stream still completes whole
        result = {}

        def stream():
            result["r"] = _complete(url, max_tokens=60, stream=True)

        t = threading.Thread(target=stream)
        t.start()
        while not engine.stats()["num_running"]:
            pass
        r = httpx.post(url + "/sleep?level=1", headers=AUTH, timeout=60)
        t.join()
        assert r.status_code == 200
        chunks = [line for line in result["r"].text.splitlines() if line.startswith("data:")]
        assert chunks[-1] == "data: [DONE]" and '"finish_reason":"length"' in chunks[-2]
        assert httpx.get(url + "/is_sleeping", headers=AUTH, timeout=30).json() == \
            {"is_sleeping": True}
        asleep = _complete(url)
        assert asleep.status_code == 503
        assert asleep.json()["error"]["code"] == "engine_sleeping"
        for path, param in (("/sleep?level=3", "level"), ("/wake_up?tags=gpu", "tags")):
            r = httpx.post(url + path, headers=AUTH, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert httpx.post(url + "/wake_up?tags=weights", headers=AUTH,
                          timeout=60).status_code == 200
        assert httpx.get(url + "/is_sleeping", headers=AUTH, timeout=30).json() == \
            {"is_sleeping": True}                 # the KV cache still sleeps
        assert httpx.post(url + "/wake_up", headers=AUTH, timeout=60).status_code == 200
        assert httpx.get(url + "/is_sleeping", headers=AUTH, timeout=30).json() == \
            {"is_sleeping": False}
        awake = _complete(url)
        assert awake.status_code == 200 and awake.json()["choices"][0]["text"] == want
        assert httpx.post(url + "/reset_prefix_cache", headers=AUTH,
                          timeout=30).status_code == 200
        assert _complete(url).json()["choices"][0]["text"] == want
