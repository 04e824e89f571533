"""Structured outputs through the engine (tiny dummy model, byte tokenizer and a HF BPE
tokenizer): every constrained output parses with strict json.loads and validates, batched
with unconstrained requests; n > 1, seeds, overlap on/off, preemption and chunked prefill
give the same outputs; regex / choice / grammar; ignore_eos; clear errors."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from test_structured_outputs import schemas

from minikernels.engine import LLM, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "n": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "n"], "additionalProperties": False}


def _llm(**kw) -> LLM:
    kw.setdefault("block_size", 16)
    return LLM("tiny", dtype="float32", device="cpu", **kw)


def _constrained(max_tokens=120, **so):
    return SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=max_tokens,
                          structured_outputs=so or {"json": SCHEMA})


def _texts(outs):
    return [[c.text for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return _llm()


def test_json_schema_batched_with_free_requests(llm):
    free = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    prompts = ["Give me JSON", [5, 6, 7], "x" * 40, "Another"]
    params = [_constrained(), free, _constrained(), free]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o, p in zip(outs, params):
        for c in o.outputs:
            if p.structured_outputs is None:
                assert len(c.token_ids) == 12
                continue
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.text), SCHEMA)
    llm.llm_engine.check_no_leaks()


def test_same_outputs_with_overlap_preemption_and_chunking(llm):
    check_same_outputs(llm, _llm)


def check_same_outputs(llm: LLM, make_llm) -> None:
    """JSON / regex / choice outputs of ``llm`` equal engines made by ``make_llm(**kw)``
    with overlap off, a pool small enough to preempt, and chunked prefill; regexes and
    choices valid."""
    prompts = ["a" * 20, "b" * 30, "c"]
    params = [_constrained(), _constrained(regex=r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"),
              _constrained(choice=["alpha", "beta", "gamma"])]
    base = _texts(llm.generate(prompts, params, use_tqdm=False))
    for kw in (dict(async_scheduling=False), dict(num_kv_blocks=10, enable_prefix_caching=False),
               dict(max_num_batched_tokens=16, max_num_seqs=2)):
        other = make_llm(**kw)
        assert _texts(other.generate(prompts, params, use_tqdm=False)) == base, kw
        other.llm_engine.check_no_leaks()
    assert all(re.fullmatch(r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)", t) for t in base[1])
    assert all(t in ("alpha", "beta", "gamma") for t in base[2])


def test_random_schemas(llm):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
    @given(schema=schemas())
    def check(schema):
        check_schema_outputs(llm, schema)

    check()


def check_schema_outputs(llm: LLM, schema: dict) -> None:
    """Every finished output of a request constrained by ``schema`` validates."""
    out = llm.generate(["json please"], _constrained(max_tokens=300, json=schema),
                       use_tqdm=False)[0]
    for c in out.outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)


def test_grammar_and_ignore_eos(llm):
    sp = SamplingParams(temperature=1.0, seed=1, max_tokens=100, ignore_eos=True,
                        structured_outputs={"grammar": 'root ::= "(" [0-9] ("+" [0-9])? ")"'})
    out = llm.generate(["sum"], sp, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"\(\d(\+\d)?\)", out.text) and out.finish_reason == "stop"


def test_errors(llm):
    with pytest.raises(ValueError, match="structured_outputs.regex is not supported"):
        llm.generate(["x"], SamplingParams(structured_outputs={"regex": "(open"}),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured_outputs={})
    with pytest.raises(TypeError, match="structured_outputs must be"):
        SamplingParams(structured_outputs="json")
    no_tok = LLM("tiny", dtype="float32", device="cpu", tokenizer=None)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        no_tok.generate([[1, 2]], SamplingParams(structured_outputs={"regex": "a"}),
                        use_tqdm=False)
    llm.llm_engine.check_no_leaks()


def test_hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minikernels.models.tokenizer import HFTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # "<eos>" gets id 257: the dummy model's EOS (the engine stops on the model's ids)
    specials = [f"<unused{i}>" for i in range(257)] + ["<eos>"]
    bpe.train_from_iterator(['{"name": "ab", "n": 12}'] * 20, trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>"))
    assert tok.eos_token_ids == [257]
    llm = _llm(tokenizer=tok)
    outs = llm.generate(["hi"], _constrained(), use_tqdm=False)
    for c in outs[0].outputs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_abort_frees_matchers_and_others_finish(llm):
    """Aborting a constrained request mid-decode drops its matchers (nothing keeps them
    alive once its in-flight token is read back); the other requests still validate."""
    import gc
    import weakref

    eng = llm.llm_engine
    for rid in ("keep", "drop"):
        eng.add_request(rid, "json please", _constrained(max_tokens=200))
    for _ in range(6):
        eng.step()
    refs = [weakref.ref(s.grammar) for s in eng.requests["drop"].seqs]
    assert all(r() is not None for r in refs)
    assert eng.abort_request("drop") is not None
    outs = {}
    while eng.has_unfinished():
        for req in eng.step():
            if req.finished:
                outs[req.request_id] = req.to_output()
    gc.collect()
    assert all(r() is None for r in refs)
    for c in outs["keep"].outputs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)
    eng.check_no_leaks()


def test_preemption_keeps_matcher_state():
    """A KV pool too small for the batch preempts constrained sequences (recompute): their
    matchers keep their state, so outputs equal an unpreempted run and still validate."""
    prompts = ["p" * 30, "q" * 30, "r" * 30]
    params = [_constrained(max_tokens=150) for _ in prompts]
    base = _texts(_llm().generate(prompts, params, use_tqdm=False))
    small = _llm(num_kv_blocks=12, enable_prefix_caching=False)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert _texts(outs) == base
    for o in outs:
        for c in o.outputs:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), SCHEMA)
    small.llm_engine.check_no_leaks()


def test_constrained_steps_keep_the_overlap():
    """With overlap on, a step with constrained (or penalised) rows is read back inside
    the next launch, after its forward started: one engine.step() per decode round, and
    the outputs equal the overlap-off run (grammars, penalties, stop ids, free rows)."""
    prompts = ["a" * 10, "b" * 12, "c", "d" * 7]
    params = [_constrained(max_tokens=80),
              SamplingParams(temperature=1.0, seed=5, max_tokens=40, presence_penalty=0.8,
                             frequency_penalty=0.3, ignore_eos=True),
              _constrained(max_tokens=60, regex=r"[a-z]{2,10}(-[0-9]{1,3}){2}"),
              SamplingParams(temperature=1.0, seed=9, max_tokens=30, stop_token_ids=[65])]
    sync = _llm(async_scheduling=False)
    expect = _texts(sync.generate(prompts, params, use_tqdm=False))
    over = _llm(async_scheduling=True)
    eng = over.llm_engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", p, sp)
    calls = 0
    done = {}
    while eng.has_unfinished():
        calls += 1
        for req in eng.step():
            if req.finished:
                done[req.request_id] = req.to_output()
    assert _texts([done[f"r{i}"] for i in range(len(prompts))]) == expect
    assert calls <= eng.num_steps + 2        # no step() spent on a read-back alone
    eng.check_no_leaks()


def test_start_after_leaves_the_output_free_until_the_marker(llm):
    """``start_after`` (a reasoning model's ``</think>``): tokens are free (greedy equals
    the unconstrained run) up to and including the marker's first occurrence, and the
    constraint governs only what follows; a marker that never comes leaves the whole
    output free. Same with overlap off."""
    prompts = ["Give me JSON", "x" * 40]
    free = SamplingParams(temperature=0, max_tokens=16)
    base = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    regex = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
    for other in (llm, _llm(async_scheduling=False)):
        for ids in base:
            marker = ids[2:4]
            end = next(i for i in range(len(ids)) if ids[i:i + 2] == marker) + 2
            sp = SamplingParams(temperature=0, max_tokens=60, structured_outputs={
                "regex": regex, "start_after": marker})
            out = other.generate([prompts[base.index(ids)]], sp, use_tqdm=False)[0].outputs[0]
            assert out.token_ids[:end] == ids[:end]
            tail = llm.get_tokenizer().decode(out.token_ids[end:])
            assert re.fullmatch(regex, tail) and out.finish_reason == "stop", (out, tail)
        never = SamplingParams(temperature=0, max_tokens=16, structured_outputs={
            "regex": regex, "start_after": [1, 2, 3, 4, 5]})
        outs = other.generate(prompts, never, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == base
        other.llm_engine.check_no_leaks()
    for bad in ([], [-1], ["a"], [True], "x"):
        with pytest.raises(ValueError, match="start_after must be a non-empty list"):
            SamplingParams(structured_outputs={"regex": "a", "start_after": bad})
