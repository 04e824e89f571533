"""AsyncLLM: concurrent streams, deltas, abort frees blocks, overload, validation, shutdown."""
from __future__ import annotations

import asyncio

import pytest

from minikernels.engine import LLM, AsyncLLM, EngineOverloaded, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=128, block_size=16)


def run(coro):
    return asyncio.run(coro)


async def collect(engine: AsyncLLM, prompt, params, rid):
    outs = []
    async for out in engine.generate(prompt, params, rid):
        outs.append(out)
    return outs


def test_streams_match_offline_generate(llm):
    prompts = [[1, 2, 3], [7] * 20, [4, 5], list(range(30, 70))]
    params = SamplingParams(max_tokens=12, **GREEDY)
    offline = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    async def main():
        engine = AsyncLLM(llm)
        try:
            results = await asyncio.gather(*[collect(engine, p, params, f"s{i}")
                                             for i, p in enumerate(prompts)])
            return results, engine.stats()
        finally:
            await engine.shutdown()

    results, stats = run(main())
    for outs, want in zip(results, offline):
        final = outs[-1]
        assert final.finished and final.outputs[0].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
        c = final.outputs[0]
        assert c.token_ids == want.token_ids and c.text == want.text
        # Deltas concatenate to the whole output; snapshots are cumulative.
        assert sum((o.outputs[0].delta_token_ids for o in outs), []) == c.token_ids
        assert "".join(o.outputs[0].delta_text for o in outs) == c.text
        lens = [len(o.outputs[0].token_ids) for o in outs]
        assert lens == sorted(lens)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["generation_tokens_total"] >= 48 and stats["num_running"] == 0


def test_abort_frees_blocks_and_ends_the_stream(llm):
    async def main():
        engine = AsyncLLM(llm)
        params = SamplingParams(max_tokens=2000 - 40, **GREEDY)
        seen = []

        async def consume():
            async for out in engine.generate(list(range(40)), params, "long"):
                seen.append(out)
        task = asyncio.create_task(consume())
        while not seen:
            await asyncio.sleep(0.01)
        busy = engine.stats()
        await engine.abort("long")
        after = engine.stats()
        await asyncio.wait_for(task, 30)
        await engine.shutdown()
        return busy, after, seen

    busy, after, seen = run(main())
    assert busy["kv_blocks_free"] < busy["kv_blocks_total"]
    assert after["kv_blocks_free"] == after["kv_blocks_total"] and after["num_running"] == 0
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    llm.llm_engine.check_no_leaks()


def test_leaving_the_stream_early_aborts(llm):
    async def main():
        engine = AsyncLLM(llm)
        gen = engine.generate([1, 2, 3], SamplingParams(max_tokens=1000, **GREEDY), "early")
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(200):
            if engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"] \
                    and engine.stats()["num_running"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        await engine.shutdown()
        return stats

    stats = run(main())
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_validation_and_overload(llm):
    async def main():
        engine = AsyncLLM(llm, max_queue=2)
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(engine, [1] * 10, SamplingParams(max_tokens=engine.max_model_len),
                          "too-long")
        with pytest.raises(TypeError, match="SamplingParams"):
            await collect(engine, [1], {"max_tokens": 3}, "bad-params")
        # Fill the queue without letting the engine thread drain it.
        engine._ensure_started()
        engine._pending += 2
        try:
            with pytest.raises(EngineOverloaded, match="max_queue"):
                await collect(engine, [1], SamplingParams(max_tokens=2), "over")
        finally:
            engine._pending -= 2
        outs = await collect(engine, "hi", SamplingParams(max_tokens=3, **GREEDY), "ok")
        await engine.shutdown()
        return outs

    outs = run(main())
    assert outs[-1].prompt == "hi" and len(outs[-1].outputs[0].token_ids) == 3


def test_duplicate_request_id_and_shutdown_aborts(llm):
    async def main():
        engine = AsyncLLM.__new__(AsyncLLM)
        AsyncLLM.__init__(engine, llm)
        params = SamplingParams(max_tokens=1500, **GREEDY)
        first = engine.generate([1, 2], params, "dup")
        out = await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await collect(engine, [3], params, "dup")
        await engine.shutdown()
        rest = [o async for o in first]
        return out, rest, engine.stats()

    out, rest, stats = run(main())
    assert not out.finished
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_from_args_and_properties():
    engine = AsyncLLM.from_args("tiny", dtype="float32", device="cpu", num_kv_blocks=32,
                                max_queue=5)
    assert engine.max_queue == 5 and engine.model_name == "tiny"
    assert engine.max_model_len == 32 * 64 and engine.tokenizer is not None   # block 64
    s = engine.stats()
    for key in ("num_running", "num_waiting", "kv_usage", "kv_blocks_free", "kv_blocks_total",
                "prompt_tokens_total", "generation_tokens_total", "tokens_per_s"):
        assert key in s


def test_engine_error_reaches_every_stream_and_frees_blocks():
    # A step that raises kills the loop: every waiting consumer (running, or still queued
    # as an "add") gets EngineDeadError instead of hanging; blocks are freed; later calls
    # fail fast.
    from minikernels.engine.async_llm import EngineDeadError

    llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=16)
    eng = llm.llm_engine
    real_step, calls = eng.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step()

    eng.step = step

    async def consume(engine, rid):
        try:
            await asyncio.wait_for(collect(engine, [1, 2, 3], SamplingParams(
                max_tokens=50, **GREEDY), rid), timeout=20)
        except EngineDeadError as exc:
            return exc
        return None

    async def main():
        engine = AsyncLLM(llm)
        errs = await asyncio.gather(*(consume(engine, f"r{i}") for i in range(4)))
        assert engine.errored and not engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(engine, [1], SamplingParams(max_tokens=2), "late")
        await engine.abort("r0")       # returns (nothing to do), never hangs
        await engine.shutdown()
        return errs, engine.stats()

    errs, stats = run(main())
    assert all(isinstance(e, EngineDeadError) for e in errs), errs
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    eng.check_no_leaks()


def test_commands_racing_the_end_of_the_loop_are_answered(llm):
    # generate / abort check that the loop is alive, then send; if the loop ends in
    # between, the command must still be answered (it used to sit in the queue forever).
    async def main():
        engine = AsyncLLM(llm)
        await collect(engine, [1, 2], SamplingParams(max_tokens=2, **GREEDY), "warm")
        thread = engine._thread
        await engine.shutdown()
        assert not thread.is_alive()
        engine._ensure_started = lambda: None        # the check passed just before the end
        with pytest.raises(RuntimeError, match="stopped"):
            await asyncio.wait_for(collect(engine, [3, 4], SamplingParams(max_tokens=2),
                                           "late"), timeout=10)
        thread.is_alive = lambda: True               # likewise for abort's check
        await asyncio.wait_for(engine.abort("late"), timeout=10)
        return engine.num_waiting()

    assert run(main()) == 0
