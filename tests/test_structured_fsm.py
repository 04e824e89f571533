"""The "outlines" structured-outputs backend (engine/structured_fsm.py): regular
constraints as token automata built by outlines-core, matched in bulk.

The automata against outlines-core's own index (allowed tokens and next states of every
state, packed tables, stop tokens, bytes of partial UTF-8 characters); bulk matching
equal to one token at a time, rollback; through the engine: JSON schemas (random ones
too), regexes and choices valid and batched with free requests and with xgrammar rows
(json_object / EBNF fall back to it), the same outputs with overlap off, preemption and
chunked prefill, n > 1 and seeds, ignore_eos, start_after, greedy n-gram speculation
token-identical, and clear errors."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest
import torch
from test_engine_structured import SCHEMA, _constrained, _texts, check_schema_outputs

from minikernels.engine import LLM, SamplingParams
from minikernels.engine.structured_fsm import FsmBank, FsmIndex, fsm_regex
from minikernels.engine.structured_outputs import StructuredOutputsParams

oc = pytest.importorskip("outlines_core")

EMAIL = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"

# a byte vocabulary plus multi-byte tokens (one a partial UTF-8 character), stop id 300
VOCAB = [bytes([i]) for i in range(256)] + [b"ab", b"abc", b"12", b'{"', b'":', b"\xe4\xbd",
                                            b"\xa0x", b"com", b".org", b"@"] + [b""] * 35
EOS = 300


def _reference(regex: str) -> tuple[object, dict[bytes, list[int]]]:
    by = {}
    for t, raw in enumerate(VOCAB):
        if raw and t != EOS:
            by.setdefault(raw, []).append(t)
    return oc.Index(regex, oc.Vocabulary(EOS, by)), by


@pytest.mark.parametrize("regex", [EMAIL, r"(ab|cd)+x?", "\u4f60[0-9]{1,3}", r"(alpha|beta)",
                                   fsm_regex("json", StructuredOutputsParams(json=SCHEMA))])
def test_index_equals_outlines_core(regex):
    """Every state's allowed tokens (the packed table row) and next states (default +
    exceptions, through the bank) equal outlines-core's index; stop ids only in final
    states, where they keep the state."""
    index = FsmIndex(regex, VOCAB, [EOS], len(VOCAB))
    ref, _ = _reference(regex)
    bank = FsmBank((len(VOCAB) + 31) // 32, len(VOCAB))
    bank.add(index)
    names = sorted(set(ref.get_transitions()) | set(ref.get_final_states())
                   | {ref.get_initial_state()})
    assert index.num_states == len(names)
    unpacked = ((index.table.numpy()[:, :, None].astype(np.int64) >> np.arange(32)) & 1)
    unpacked = unpacked.reshape(index.num_states, -1)[:, :len(VOCAB)].astype(bool)
    for local, name in enumerate(names):
        allowed = set(ref.get_allowed_tokens(name) or [])
        if ref.is_final_state(name):
            assert EOS in allowed
        assert set(np.flatnonzero(unpacked[local]).tolist()) == allowed, (regex, name)
        for tok in sorted(allowed):
            bank.state[0], bank.done[0] = local, False
            assert bank.accept(np.array([0]), np.array([tok]))[0] == (1 if tok == EOS else 0)
            want = name if tok == EOS else ref.get_next_state(name, tok)
            assert names[int(bank.state[0])] == want, (regex, name, tok)


def test_bulk_accept_equals_one_at_a_time_and_rolls_back():
    """Random walks of 64 grammars over two automata, advanced together, equal each
    grammar advanced alone; refused tokens and tokens after a stop are refused without a
    move; rollback restores state and done."""
    vocab = len(VOCAB)
    words = (vocab + 31) // 32
    bank, alone = FsmBank(words, vocab), FsmBank(words, vocab)
    indices = [FsmIndex(r, VOCAB, [EOS], vocab) for r in (EMAIL, r"(ab|12)+")]
    rng = random.Random(0)
    grammars = [bank.new_grammar(indices[i % 2], None) for i in range(64)]
    singles = [alone.new_grammar(indices[i % 2], None) for i in range(64)]
    for _ in range(40):
        toks = []
        for g in grammars:          # mostly allowed tokens, some refused ones
            row = bank.table[g.row].astype(np.int64)
            ok = np.flatnonzero(((row[:, None] >> np.arange(32)) & 1).reshape(-1))
            toks.append(int(rng.choice(ok)) if ok.size and rng.random() < 0.9
                        else rng.randrange(vocab))
        got = bank.accept(np.array([g.slot for g in grammars]), np.array(toks))
        for g, s, t, r in zip(grammars, singles, toks, got):
            assert s.accept(t) == (r != 2)
            assert s.terminated == g.terminated == bool(bank.done[g.slot])
            assert alone.state[s.slot] - s.base == bank.state[g.slot] - g.base
    g = bank.new_grammar(indices[1], None)
    assert g.accept(VOCAB.index(b"ab")) and g.accept(EOS) and g.terminated
    assert not g.accept(VOCAB.index(b"12"))          # nothing after a stop token
    g.rollback(2)
    assert not g.terminated and g.row == g.base + indices[1].initial


def test_bank_stays_bounded_and_moves_live_states():
    """Past max_table_bytes the bank keeps only the automata live grammars follow; their
    states (and rollback) keep working at the new ids; the compile cache is LRU-bounded."""
    import gc

    vocab = len(VOCAB)
    one = FsmIndex(r"(ab|12)+", VOCAB, [EOS], vocab)
    per = one.table.numel() * 4
    bank = FsmBank((vocab + 31) // 32, vocab, max_table_bytes=3 * per)
    keep = bank.new_grammar(one, None)
    assert keep.accept(VOCAB.index(b"ab"))
    for i in range(6):          # distinct automata, each dropped once its grammar is gone
        g = bank.new_grammar(FsmIndex(f"(ab|12)+{'x' * (i + 1)}", VOCAB, [EOS], vocab), None)
        del g
        gc.collect()
        assert bank.table.nbytes <= 3 * per + 4 * bank.words * 8
    assert len(bank.indices) <= 3 and any(i is one for i in bank.indices)
    assert keep.accept(VOCAB.index(b"12")) and keep.accept(EOS) and keep.terminated
    keep.rollback(2)
    assert not keep.terminated and keep.accept(VOCAB.index(b"ab"))
    from minikernels.engine.structured_outputs import StructuredOutputManager
    from minikernels.models.tokenizer import ByteTokenizer

    mgr = StructuredOutputManager(ByteTokenizer(), 512, [1], backend="outlines")
    mgr.max_cached = 2
    for n in range(4):
        mgr.compile(StructuredOutputsParams(regex=f"a{{{n + 1}}}"))
    assert len(mgr._cache) == 2
    mgr.shutdown()


def _llm(**kw) -> LLM:
    kw.setdefault("block_size", 16)
    return LLM("tiny", dtype="float32", device="cpu",
               structured_outputs_config={"backend": "outlines"}, **kw)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return _llm()


def test_json_regex_choice_batched_with_free_and_xgrammar_rows(llm):
    """Automaton rows beside free rows and xgrammar rows (json_object, an EBNF grammar)
    in the same steps: every output is valid."""
    free = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    grammar = 'root ::= "x" [0-9]+ "y"'
    params = [_constrained(), free, _constrained(regex=EMAIL),
              _constrained(choice=["alpha", "beta", "gamma"]),
              _constrained(json_object=True), _constrained(grammar=grammar), free]
    outs = llm.generate(["Give me JSON", [5, 6, 7], "mail", "pick", "obj", "g", "zz"], params,
                        use_tqdm=False)
    eng = llm.llm_engine
    kinds = {}
    for p in params:
        if p.structured_outputs is not None:
            so = p.structured_outputs
            kinds[so.kind] = eng.structured.compile(so).fsm is not None
    assert kinds == {"json": True, "regex": True, "choice": True, "json_object": False,
                     "grammar": False}
    for o, p in zip(outs, params):
        for c in o.outputs:
            so = p.structured_outputs
            if so is None:
                assert len(c.token_ids) == 12
                continue
            assert c.finish_reason == "stop", c
            if so.kind == "json":
                jsonschema.validate(json.loads(c.text), SCHEMA)
            elif so.kind == "regex":
                assert re.fullmatch(EMAIL, c.text)
            elif so.kind == "choice":
                assert c.text in ("alpha", "beta", "gamma")
            elif so.kind == "json_object":
                assert isinstance(json.loads(c.text), dict)
            else:
                assert re.fullmatch(r"x[0-9]+y", c.text)
    eng.check_no_leaks()


def test_same_outputs_with_overlap_preemption_and_chunking(llm):
    from test_engine_structured import check_same_outputs

    check_same_outputs(llm, _llm)


def test_device_resident_automata_equal_host_ones_and_skip_the_early_read_back():
    """On a GPU without a proposer the automata live on the device (ops.fsm_advance after
    sampling; forced here on the CPU): outputs equal host-matched automata (same seeds; JSON, regex, choice,
    ignore_eos, free rows, an xgrammar row mixed in) with overlap on and off, and a step
    whose constraints are all device automata is not read back early (its tokens are not
    needed on the host before the next launch)."""
    prompts = ["a" * 10, "b" * 12, "c", "d" * 7, "e"]
    params = [_constrained(max_tokens=80), _constrained(max_tokens=60, regex=EMAIL),
              SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True,
                             structured_outputs={"choice": ["yes", "no"]}),
              SamplingParams(temperature=1.0, seed=9, max_tokens=30),
              _constrained(max_tokens=40, grammar='root ::= "x" [0-9]+ "y"')]
    runs = {}
    for device_states in (True, False):
        for overlap in (True, False):
            llm = _llm(async_scheduling=overlap)
            llm.llm_engine._structured_manager().device_states = device_states
            runs[device_states, overlap] = _texts(llm.generate(prompts, params,
                                                               use_tqdm=False))
            llm.llm_engine.check_no_leaks()
    assert len({json.dumps(v) for v in runs.values()}) == 1, runs
    eng = _llm().llm_engine
    eng._structured_manager().device_states = True    # (the engine's choice on a GPU)
    for i, (p, sp) in enumerate(zip(prompts[:4], params[:4])):
        eng.add_request(f"r{i}", p, sp)
    early = []
    while eng.has_unfinished():
        eng.step()
        if eng._in_flight is not None:
            early.append(eng._in_flight.needs_host_tokens)
    assert early and not any(early)


def test_random_schemas(llm):
    """Schemas outlines-core turns into a regex run as automata, the others fall back to
    xgrammar: every finished output validates."""
    from hypothesis import HealthCheck, given, settings
    from test_structured_outputs import schemas

    kinds = []

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(schema=schemas())
    def check(schema):
        compiled = llm.llm_engine._structured_manager().compile(
            StructuredOutputsParams(json=schema))
        kinds.append(compiled.fsm is not None)
        check_schema_outputs(llm, schema)
    check()
    assert any(kinds), "no random schema ran as an automaton"


def test_schemas_with_keywords_the_regex_ignores_go_to_xgrammar(llm):
    """outlines-core's regex ignores minimum / maximum, multipleOf, uniqueItems, ...: such
    schemas are matched by xgrammar (which enforces them), so outputs stay valid."""
    from minikernels.engine.structured_fsm import unsupported_schema_keyword

    bounded = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                       "maximum": 10}}, "required": ["n"]}
    assert unsupported_schema_keyword(bounded) == "minimum"
    assert unsupported_schema_keyword({"type": "array", "uniqueItems": True}) == "uniqueItems"
    assert unsupported_schema_keyword({"anyOf": [{"type": "string", "format": "email"}]}) \
        == "format 'email'"
    assert unsupported_schema_keyword({"$defs": {"a": {"type": "integer"}}, "type": "object",
                                       "properties": {"x": {"$ref": "#/$defs/a"}},
                                       "additionalProperties": False}) is None
    eng = llm.llm_engine
    assert eng._structured_manager().compile(StructuredOutputsParams(json=bounded)).fsm is None
    out = llm.generate(["n"], _constrained(json=bounded), use_tqdm=False)[0]
    for c in out.outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), bounded)


def test_ignore_eos_and_start_after(llm):
    """Under ignore_eos a complete automaton ends the request (nothing can follow); with
    start_after the output is free until the marker, then constrained."""
    outs = llm.generate(["p"], SamplingParams(
        temperature=1.0, seed=1, max_tokens=50, ignore_eos=True,
        structured_outputs={"choice": ["yes", "no"]}), use_tqdm=False)
    assert outs[0].outputs[0].text in ("yes", "no")
    assert outs[0].outputs[0].finish_reason == "stop"
    hash_ = ord("#")       # (the tiny model's byte tokenizer: token id = byte)
    out = llm.generate(["q"], SamplingParams(
        temperature=0.0, max_tokens=40, logit_bias={hash_: 100.0},
        structured_outputs={"regex": "[0-9]{3}", "start_after": [hash_]}),
        use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"#[0-9]{3}", out.text) and out.finish_reason == "stop"


def test_greedy_ngram_speculation_is_exact_with_automata():
    """n-gram drafts on automaton rows are cut where the automaton refuses them (a
    rollback per verification); greedy outputs equal decoding without speculation."""
    params = SamplingParams(temperature=0.0, max_tokens=60,
                            structured_outputs={"regex": "(ab|abc|12)+x"})
    prompts = ["ab" * 10, "12ab" * 6]
    want = [o.outputs[0].token_ids for o in _llm().generate(prompts, params, use_tqdm=False)]
    spec = _llm(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == want


def test_errors():
    with pytest.raises(ValueError, match="structured_outputs_config.backend"):
        LLM("tiny", dtype="float32", device="cpu",
            structured_outputs_config={"backend": "guidance"})
    with pytest.raises(ValueError, match=r"unknown keys \['backnd'\]"):
        LLM("tiny", dtype="float32", device="cpu",
            structured_outputs_config={"backnd": "outlines"})
    with pytest.raises(ValueError, match="stop token"):
        FsmIndex("a", VOCAB, [], len(VOCAB))
    index = FsmIndex("a", VOCAB, [EOS], len(VOCAB))     # 'a' = 97: word 3, bit 1
    want = torch.zeros(index.table.shape[1], dtype=torch.int32)
    want[3] = 2
    assert torch.equal(index.table[index.initial], want)


def test_a_missing_outlines_core_fails_at_start_up(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "outlines_core", None)     # (an import then fails)
    with pytest.raises(ImportError, match="needs outlines-core"):
        LLM("tiny", dtype="float32", device="cpu",
            structured_outputs_config={"backend": "outlines"})


def test_serve_flag_reaches_the_engine():
    import argparse

    from minikernels.server.cli import add_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["tiny", "--structured-outputs-config", '{"backend": "outlines"}'])
    kwargs = engine_kwargs(args)
    assert kwargs["structured_outputs_config"] == {"backend": "outlines"}
    assert "structured_outputs_config" not in engine_kwargs(parser.parse_args(["tiny"]))
    llm = LLM("tiny", dtype="float32", device="cpu", **{
        k: v for k, v in kwargs.items() if k in ("structured_outputs_config", "seed")})
    out = llm.generate(["x"], SamplingParams(max_tokens=20, structured_outputs={
        "choice": ["on", "off"]}), use_tqdm=False)[0].outputs[0]
    assert out.text in ("on", "off") and llm.llm_engine.structured.backend == "outlines"
