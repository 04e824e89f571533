"""AsyncLLM: concurrent streams, deltas, abort frees blocks, overload, validation, shutdown."""
from __future__ import annotations

import asyncio
import time

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


def _concat(outs, j=0):
    """Concatenate DELTA outputs of sample j: (token ids, text, logprobs)."""
    ids, text, lps = [], "", []
    for o in outs:
        c = next(c for c in o.outputs if c.index == j)
        ids += c.token_ids
        text += c.text
        lps += c.logprobs or []
    return ids, text, lps


def test_delta_outputs_concatenate_to_the_cumulative_output(llm):
    # n=2 seeded sampling with logprobs and a stop string: DELTA outputs (the server's
    # kind) concatenate to exactly what CUMULATIVE and FINAL_ONLY report.
    from minikernels.engine.sampling_params import RequestOutputKind as K

    base = dict(max_tokens=24, temperature=0.8, seed=7, n=2, logprobs=2, ignore_eos=True)
    probe = llm.generate([[5, 6, 7]], SamplingParams(**base), use_tqdm=False)[0]
    text0 = probe.outputs[0].text
    stop = text0[6:8] if len(text0) > 8 and text0.find(text0[6:8]) == 6 else None
    assert stop is not None
    kw = dict(base, stop=[stop] if stop else None, include_stop_str_in_output=True)

    async def main():
        engine = AsyncLLM(llm)
        try:
            res = {}
            for kind in (K.DELTA, K.CUMULATIVE, K.FINAL_ONLY):
                res[kind] = await collect(engine, [5, 6, 7],
                                          SamplingParams(output_kind=kind, **kw), kind.name)
            return res
        finally:
            await engine.shutdown()

    res = run(main())
    final = res[K.FINAL_ONLY]
    assert len(final) == 1 and final[0].finished
    cum = res[K.CUMULATIVE][-1]
    for j in range(2):
        ids, text, lps = _concat(res[K.DELTA], j)
        want = next(c for c in cum.outputs if c.index == j)
        fin = next(c for c in final[0].outputs if c.index == j)
        assert ids == want.token_ids == fin.token_ids
        assert text == want.text == fin.text
        assert len(lps) == len(ids) and lps == want.logprobs
        last = next(c for c in res[K.DELTA][-1].outputs if c.index == j)
        assert last.finish_reason == want.finish_reason == fin.finish_reason
        assert last.stop_reason == want.stop_reason
    assert all(not o.finished for o in res[K.DELTA][:-1]) and res[K.DELTA][-1].finished


def test_cancelled_consumer_aborts_and_gc_thresholds_are_restored(llm):
    import gc

    before = gc.get_threshold()

    async def main():
        engine = AsyncLLM(llm)
        seen = []

        async def consume():
            async for out in engine.generate([1, 2, 3], SamplingParams(
                    max_tokens=1500, **GREEDY), "cancel-me"):
                seen.append(out)
        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        busy_thresholds = gc.get_threshold()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            s = engine.stats()
            if s["num_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)           # the engine loop goes idle
        idle_thresholds = gc.get_threshold()
        # The id is free again once the stream is gone.
        outs = await collect(engine, [4], SamplingParams(max_tokens=2, **GREEDY), "cancel-me")
        await engine.shutdown()
        return s, busy_thresholds, idle_thresholds, outs

    s, busy, idle, outs = run(main())
    assert s["num_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
    assert busy[0] >= 20_000 and idle == before == gc.get_threshold()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2
    llm.llm_engine.check_no_leaks()


def test_server_streams_delta_outputs_equal_to_the_whole_response():
    # The HTTP server asks AsyncLLM for DELTA outputs: streamed choices (n=2, logprobs,
    # stop strings with and without include_stop_str_in_output) must join to the
    # non-streamed response, with the same finish reasons and usage.
    import json

    import httpx

    pytest.importorskip("fastapi")
    from minikernels.server import create_app
    from minikernels.server.testing import LiveServer

    engine = AsyncLLM.from_args("tiny", dtype="float32", device="cpu", num_kv_blocks=64,
                                block_size=16)
    assert engine.honors_output_kind
    base = {"model": "tiny", "prompt": "hello there", "max_tokens": 20, "n": 2,
            "temperature": 0.9, "seed": 11, "logprobs": 2, "ignore_eos": True}
    with LiveServer(create_app(engine, served_model_name="tiny")) as srv:
        url = srv.base_url + "/v1/completions"
        probe = httpx.post(url, json=base, timeout=60).json()
        t0 = probe["choices"][0]["text"]
        stop = next((t0[i:i + 2] for i in range(3, len(t0) - 2)
                     if t0.find(t0[i:i + 2]) == i), None)
        assert stop is not None
        bodies = [base, {**base, "stop": [stop]} if stop else base,
                  {**base, "stop": [stop], "include_stop_str_in_output": True}
                  if stop else base]
        for body in bodies:
            whole = httpx.post(url, json=body, timeout=60).json()
            r = httpx.post(url, json={**body, "stream": True,
                                      "stream_options": {"include_usage": True}}, timeout=60)
            lines = [ln[6:] for ln in r.text.split("\n") if ln.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            events = [json.loads(x) for x in lines[:-1]]
            assert events[-1]["usage"] == whole["usage"]
            for ch in whole["choices"]:
                parts = [c for e in events for c in e["choices"] if c["index"] == ch["index"]]
                assert "".join(c["text"] for c in parts) == ch["text"]
                assert [c["finish_reason"] for c in parts if c["finish_reason"]] == \
                    [ch["finish_reason"]]
                toks = [t for c in parts if c["logprobs"] for t in c["logprobs"]["tokens"]]
                lps = [x for c in parts if c["logprobs"]
                       for x in c["logprobs"]["token_logprobs"]]
                assert toks == ch["logprobs"]["tokens"]
                assert lps == pytest.approx(ch["logprobs"]["token_logprobs"], abs=1e-5)


def test_stream_interval_posts_every_kth_step_with_the_same_output(llm):
    from minikernels.engine.sampling_params import RequestOutputKind as K

    params = SamplingParams(max_tokens=17, output_kind=K.DELTA, **GREEDY)

    async def main(interval):
        engine = AsyncLLM(llm, stream_interval=interval)
        try:
            return await collect(engine, [9, 8, 7], params, "iv")
        finally:
            await engine.shutdown()

    every = run(main(1))
    fourth = run(main(4))
    assert _concat(every)[:2] == _concat(fourth)[:2]
    assert len(_concat(every)[0]) == 17
    assert len(fourth) <= 6                 # first token at once, then every 4th step
    assert len(fourth[0].outputs[0].token_ids) == 1 and fourth[-1].finished
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncLLM(llm, stream_interval=0)


def test_busy_gc_policy_collects_at_chosen_points(monkeypatch):
    # While busy: gen-0 threshold raised, no automatic full collections; a full one after
    # FULL_EVERY_FINISHED finished requests (and FULL_EVERY_S), and when going idle.
    import gc

    from minikernels.engine.async_llm import _BusyGC

    monkeypatch.setattr(_BusyGC, "FULL_EVERY_S", 0.0)
    monkeypatch.setattr(_BusyGC, "FULL_EVERY_FINISHED", 3)
    full = []

    def cb(phase, info):
        if phase == "stop" and info["generation"] == 2:
            full.append(1)
    before = gc.get_threshold()
    a, b = _BusyGC(), _BusyGC()
    gc.callbacks.append(cb)
    try:
        a.busy()
        b.busy()                        # two busy engines: one saved state
        assert gc.get_threshold()[0] >= _BusyGC.YOUNG and gc.get_threshold()[2] >= 1 << 20
        a.on_finished(2)
        assert not full
        a.on_finished(1)
        assert len(full) == 1 and a.finished == 0
        a.idle()                        # b still busy: thresholds stay raised
        assert gc.get_threshold()[0] >= _BusyGC.YOUNG
        b.on_finished(1)
        b.idle()                        # the last one: restore, and collect its garbage
        assert gc.get_threshold() == before and len(full) == 2
    finally:
        gc.callbacks.remove(cb)
        a.idle()
        b.idle()
    assert gc.get_threshold() == before


def test_prompt_hashed_on_the_callers_thread_hits_the_prefix_cache_per_salt(llm):
    """AsyncLLM hashes a prompt's blocks with its tokenization (not on the engine thread):
    an equal prompt with the same salt hits the cache, another salt does not."""
    prompt = list(range(40, 90))                      # 3 full blocks of 16
    params = {salt: SamplingParams(max_tokens=2, cache_salt=salt, **GREEDY)
              for salt in ("a", "b")}

    async def main():
        engine = AsyncLLM(llm)
        try:
            cached = []
            for rid, salt in (("h0", "a"), ("h1", "a"), ("h2", "b")):
                outs = await collect(engine, prompt, params[salt], rid)
                cached.append(outs[-1].num_cached_tokens)
            return cached
        finally:
            await engine.shutdown()

    assert run(main()) == [0, 48, 0]


def test_call_when_idle_waits_for_running_requests_and_holds_new_ones(llm):
    """call_when_idle(fn): the running request finishes first, fn runs on the engine
    thread with nothing unfinished, a request sent meanwhile starts only after it (or,
    aborted while it waits, ends "abort" without ever running); errors reach the caller.
    Sleep / wake_up through it: a request while asleep fails with EngineSleeping."""
    from minikernels.engine.llm_engine import EngineSleeping

    async def main():
        engine = AsyncLLM(llm)
        events = []
        try:
            first = asyncio.ensure_future(collect(
                engine, [5, 6, 7], SamplingParams(max_tokens=30, **GREEDY), "a"))
            while not engine.stats()["num_running"]:
                await asyncio.sleep(0.005)

            def fn(eng):
                events.append((eng.has_unfinished(), sorted(eng.requests),
                               time.perf_counter()))
                return 42

            call = asyncio.ensure_future(engine.call_when_idle(fn))
            await asyncio.sleep(0.01)
            later = asyncio.ensure_future(collect(
                engine, [8, 9], SamplingParams(max_tokens=3, **GREEDY), "b"))
            dropped = asyncio.ensure_future(collect(
                engine, [8, 9], SamplingParams(max_tokens=3, **GREEDY), "c"))
            await asyncio.sleep(0.01)
            await engine.abort("c")
            assert await call == 42
            a, b, c = await first, await later, await dropped
            (busy, live, t_call), = events
            assert not busy and live == []           # "a" finished, "b" not yet added
            assert len(a[-1].outputs[0].token_ids) == 30 and a[-1].finished
            assert a[-1].metrics["finished_time"] <= t_call
            assert b[-1].metrics["first_token_time"] > t_call
            assert len(b[-1].outputs[0].token_ids) == 3
            assert c[-1].finished and c[-1].outputs[0].finish_reason == "abort"
            assert c[-1].outputs[0].token_ids == []
            with pytest.raises(ZeroDivisionError):
                await engine.call_when_idle(lambda eng: 1 / 0)
            # sleep mode through it
            await engine.call_when_idle(lambda eng: eng.sleep(1))
            assert engine.is_sleeping
            with pytest.raises(EngineSleeping):
                await collect(engine, [8, 9], SamplingParams(max_tokens=3, **GREEDY), "d")
            await engine.call_when_idle(lambda eng: eng.wake_up())
            again = await collect(engine, [8, 9], SamplingParams(max_tokens=3, **GREEDY), "e")
            assert again[-1].outputs[0].token_ids == b[-1].outputs[0].token_ids
        finally:
            await engine.shutdown()
        return events

    run(main())
    assert llm.llm_engine.block_manager.num_free_blocks == \
        llm.llm_engine.block_manager.num_usable_blocks
