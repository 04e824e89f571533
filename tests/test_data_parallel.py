"""Data parallel: 2 engine replicas behind one server (CPU) give the same greedy results as
one engine; routing spreads concurrent requests by outstanding tokens and keeps prompts
with a long shared prefix on one replica; /metrics shows each replica."""
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


def test_dp_with_tp_refused():
    with pytest.raises(ValueError, match="load balancer"):
        DataParallelEngine.from_args("tiny", 2, tensor_parallel_size=2, **KW)


def test_serve_flag():
    import argparse

    from minikernels.server.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["tiny", "--data-parallel-size", "2"]).data_parallel_size == 2
