"""Data parallel: 2 engine replicas behind one server (CPU) give the same greedy results as
one engine; routing spreads concurrent requests by outstanding tokens and keeps prompts
with a long shared prefix on one replica; /metrics shows each replica. DP=2 x TP=2 (each
replica its own gloo group of one launch) gives the DP=1 TP=1 tokens."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from minikernels.engine import AsyncLLM
from minikernels.server import create_app
from minikernels.server.data_parallel import DataParallelEngine
from minikernels.server.testing import LiveServer

KW = dict(dtype="float32", device="cpu", num_kv_blocks=64, block_size=4, max_model_len=128)
PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(5 + 3 * i)] for i in range(6)]


def _complete(base: str, prompts: list[list[int]]) -> list[list[str]]:
    async def one(client: httpx.AsyncClient, p: list[int]) -> str:
        r = await client.post("/v1/completions", json={
            "model": "tiny", "prompt": p, "max_tokens": 6, "temperature": 0.0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    return asyncio.run(run())


def test_dp2_server_equals_dp1():
    dp = DataParallelEngine.from_args("tiny", 2, **KW)
    one = AsyncLLM.from_args("tiny", **KW)
    try:
        with LiveServer(create_app(dp, served_model_name="tiny")) as srv:
            got = _complete(srv.base_url, PROMPTS)
            metrics = httpx.get(srv.base_url + "/metrics").text
        with LiveServer(create_app(one, served_model_name="tiny")) as srv:
            want = _complete(srv.base_url, PROMPTS)
        assert got == want and sum(len(t) for t in got) > 0, (got, want)
        assert all(n > 0 for n in dp.routed), dp.routed          # both replicas served
        assert dp.outstanding == [0, 0]                          # all given back
        assert 'replica="1"' in metrics and "minikernels_generation_tokens_total" in metrics
    finally:
        asyncio.run(dp.shutdown())
        asyncio.run(one.shutdown())


def test_routing_prefix_affinity_and_least_outstanding():
    class Stub:
        engine = None

    dp = DataParallelEngine([Stub(), Stub()], min_prefix_blocks=2, block_size=4)
    long = list(range(3, 40))
    a = dp.route(long, 8)
    dp.outstanding[a] += 1000                     # that replica is busy now ...
    assert dp.route(long[:20] + [99, 98], 8) == a  # ... but holds the 5-block prefix
    assert dp.route([5, 6, 7], 8) == 1 - a         # short, unknown prompt: least loaded
    assert dp.route(long[:7] + [1] * 9, 8) == 1 - a  # 1 shared block < min_prefix_blocks


def _token_ids(engine: object, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy token ids of concurrent requests through an AsyncLLM-like engine."""
    from minikernels import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)

    async def one(i: int, p: list[int]) -> list[int]:
        last = None
        async for out in engine.generate(p, params, f"req-{i}"):
            last = out
        return list(last.outputs[0].token_ids)

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(run())


@pytest.mark.slow   # spawns worker processes (small: run in CI)
def test_dp2_x_tp2_equals_dp1_tp1(tmp_path):
    """--data-parallel-size 2 --tensor-parallel-size 2: one launch of 2 gloo groups (this
    process rank 0 of both, one spawned worker each); concurrent greedy requests give the
    TP=1 tokens and both replicas serve."""
    from test_model_support import make_hf_model, save_hf

    from minikernels.distributed import TensorParallelModel

    path = save_hf(make_hf_model("qwen2-tied"), str(tmp_path))
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=48, block_size=4,
              max_model_len=64, tokenizer=None)
    prompts = PROMPTS[:4]
    one = AsyncLLM.from_args(path, **kw)
    dp = DataParallelEngine.from_args(path, 2, tensor_parallel_size=2, **kw)
    try:
        models = [r.engine.model for r in dp.replicas]
        assert all(isinstance(m, TensorParallelModel) for m in models)
        assert [m.tp.group is not None for m in models] == [True, True]
        got = _token_ids(dp, prompts)
        want = _token_ids(one, prompts)
        assert got == want and all(len(t) == 5 for t in got), (got, want)
        assert all(n > 0 for n in dp.routed), dp.routed
    finally:
        asyncio.run(dp.shutdown())
        asyncio.run(one.shutdown())
        for r in dp.replicas:
            r.engine.model.close()
    import torch

    assert not torch.distributed.is_initialized()     # left when the last replica closed


def test_serve_flag():
    import argparse

    from minikernels.server.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["tiny", "--data-parallel-size", "2"]).data_parallel_size == 2


@pytest.mark.slow   # spawns a worker process (small: run in CI)
def test_tp2_server_equals_tp1():
    """`serve --tensor-parallel-size 2`: the OpenAI server over a TP=2 engine (this process
    rank 0, one spawned gloo worker) answers concurrent completions with the TP=1 text, on
    a built-in random-weight model (each rank holds its shard of the TP=1 weights)."""
    import torch

    tp = AsyncLLM.from_args("tiny", tensor_parallel_size=2, **KW)
    one = AsyncLLM.from_args("tiny", **KW)
    try:
        assert tp.engine.model.tensor_parallel_size == 2
        with LiveServer(create_app(tp, served_model_name="tiny")) as srv:
            got = _complete(srv.base_url, PROMPTS)
        with LiveServer(create_app(one, served_model_name="tiny")) as srv:
            want = _complete(srv.base_url, PROMPTS)
        assert got == want and sum(len(t) for t in got) > 0, (got, want)
    finally:
        asyncio.run(tp.shutdown())
        asyncio.run(one.shutdown())
        tp.engine.model.close()
    assert not torch.distributed.is_initialized()
