"""Sleep mode over HTTP (server/sleep_routes.py): /sleep, /wake_up, /is_sleeping and
/reset_prefix_cache behind --enable-sleep-mode and the API key; a sleep issued while a
stream runs waits for it (the stream completes whole); generation while asleep is a 503
``engine_sleeping``; after waking, the same greedy tokens; bad levels / tags are 400s."""
from __future__ import annotations

import os
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
        for path, param in (("/sleep?level=3", "level"), ("/wake_up?tags=gpu", "tags"),
                            ("/sleep?level=1&level=2", "level")):
            r = httpx.post(url + path, headers=AUTH, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = httpx.post(url + "/update_weights_from_disk", headers=AUTH, timeout=30,
                       json={"model_path": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model_path", r.text
        r = httpx.put(url + "/sleep", headers=AUTH, timeout=30)
        assert r.status_code == 405 and set(r.json()["error"]) == {
            "message", "type", "param", "code"}
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


def test_update_weights_from_disk(tmp_path):
    """SGLang's /update_weights_from_disk: a checkpoint of the same architecture replaces
    the served weights in place (the engine then generates as a fresh engine of it); a
    directory of another shape, a missing one or a sleeping engine are refused."""
    import asyncio

    from test_model_support import make_hf_model, save_hf

    from minikernels.engine import LLM

    a = save_hf(make_hf_model("llama", seed=0), str(tmp_path / "a"))
    b = save_hf(make_hf_model("llama", seed=7), str(tmp_path / "b"))
    other = save_hf(make_hf_model("llama", seed=1, hidden_size=32), str(tmp_path / "c"))
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64, block_size=16, tokenizer=None)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = [5, 9, 13, 21, 8]
    want_a, want_b = (LLM(d, **kw).generate([prompt], greedy, use_tqdm=False)[0]
                      .outputs[0].token_ids for d in (a, b))
    assert want_a != want_b
    engine = AsyncLLM.from_args(a, **kw)

    async def tokens(rid):
        out = None
        async for out in engine.generate(prompt, greedy, rid):
            pass
        return out.outputs[0].token_ids

    assert asyncio.run(tokens("before")) == want_a
    app = create_app(engine, api_key=KEY, served_model_name="m", enable_sleep_mode=True)
    with LiveServer(app) as srv:
        url = srv.base_url

        def update(path):
            return httpx.post(url + "/update_weights_from_disk", headers=AUTH, timeout=60,
                              json={"model_path": path})

        for path in (other, str(tmp_path / "missing")):
            r = update(path)
            assert r.status_code == 400 and r.json()["error"]["param"] == "model_path", r.text
        assert httpx.post(url + "/sleep?level=2", headers=AUTH, timeout=60).status_code == 200
        assert update(b).status_code == 409            # the weights are asleep
        assert httpx.post(url + "/wake_up?tags=weights", headers=AUTH,
                          timeout=60).status_code == 200
        r = update(b)
        assert r.status_code == 200 and r.json()["success"] and r.json()["num_tensors"] > 0
        assert httpx.post(url + "/wake_up", headers=AUTH, timeout=60).status_code == 200
        r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60, json={
            "model": "m", "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    assert asyncio.run(tokens("after")) == want_b
    asyncio.run(engine.shutdown())


def test_update_weights_from_disk_is_all_or_nothing(tmp_path):
    """The checkpoint is checked whole (from its safetensors headers) before any tensor is
    copied: valid tensors followed by a wrong-shaped one, an unknown one or one of an
    unsupported dtype, and a corrupt or truncated file, are 400s on model_path naming the
    problem, with every weight of the served model bit-identical; then a valid one loads."""
    import asyncio

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_model_support import make_hf_model, save_hf

    a = save_hf(make_hf_model("llama", seed=0), str(tmp_path / "a"))
    b = make_hf_model("llama", seed=7)
    good = {k: v.detach().clone().contiguous() for k, v in b.state_dict().items()}

    def checkpoint(name, tensors=None, raw=None):
        d = save_hf(b, str(tmp_path / name))
        f = str(tmp_path / name / "model.safetensors")
        if tensors is not None:
            save_file(tensors, f, metadata={"format": "pt"})
        if raw is not None:
            with open(f, "wb") as out:
                out.write(raw)
        return d

    valid = checkpoint("b")
    with open(str(tmp_path / "b" / "model.safetensors"), "rb") as f:
        data = f.read()
    cases = [   # a safetensors file lists its tensors sorted: these come after the valid ones
        ("model.norm.weight: shape mismatch",
         checkpoint("shape", {**good, "model.norm.weight": torch.ones(65)})),
        ("unknown tensor 'model.zz_bogus.weight'",
         checkpoint("unknown", {**good, "model.zz_bogus.weight": torch.ones(4)})),
        ("'model.norm.weight' must be a dense floating-point tensor",
         checkpoint("dtype", {**good, "model.norm.weight": torch.ones(64, dtype=torch.int64)})),
        ("incomplete metadata", checkpoint("truncated", raw=data[:-100])),
        ("header", checkpoint("corrupt", raw=b"\x10\x00\x00\x00\x00\x00\x00\x00not json!")),
    ]
    for name, (_, path) in zip(("model.norm.weight", "model.zz_bogus.weight"), cases):
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            assert list(f.keys())[-1] == name and len(list(f.keys())) > 10
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64, block_size=16, tokenizer=None)
    engine = AsyncLLM.from_args(a, **kw)
    model = engine.engine.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    app = create_app(engine, api_key=KEY, served_model_name="m", enable_sleep_mode=True)
    with LiveServer(app) as srv:
        for bad, path in cases:
            r = httpx.post(srv.base_url + "/update_weights_from_disk", headers=AUTH,
                           timeout=60, json={"model_path": path})
            assert r.status_code == 400, (bad, r.text)
            after = model.state_dict()
            assert [k for k in before if not torch.equal(after[k], before[k])] == [], bad
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["param"] == "model_path" and bad in err["message"], err
        r = httpx.post(srv.base_url + "/update_weights_from_disk", headers=AUTH, timeout=60,
                       json={"model_path": valid})
        assert r.status_code == 200 and r.json()["num_tensors"] == len(good), r.text
    assert torch.equal(model.state_dict()["norm.weight"], good["model.norm.weight"])
    asyncio.run(engine.shutdown())
