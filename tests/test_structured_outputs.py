"""Structured outputs below the engine: constraint validation and caching, and random walks
through the grammar matcher's bitmasks (the tokens a sampler could pick) that must always
yield output parsing with strict json.loads and validating against its schema, matching
its regex, or equal to one of its choices. Both tokenizer kinds: the built-in byte
tokenizer and a HF (tokenizers) BPE tokenizer."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minikernels.engine.structured_outputs import (StructuredOutputManager,
                                                   StructuredOutputsParams)
from minikernels.models.tokenizer import ByteTokenizer
from minikernels.ops import reference

VOCAB = 300


@pytest.fixture(scope="module")
def byte_manager() -> tuple[StructuredOutputManager, ByteTokenizer]:
    tok = ByteTokenizer(vocab_size=VOCAB)
    return StructuredOutputManager(tok, VOCAB, tok.eos_token_ids), tok


def walk(manager: StructuredOutputManager, tok, params: StructuredOutputsParams, seed: int,
         max_steps: int = 400) -> str:
    """Pick uniformly among allowed tokens (a stop token, when allowed, half the time)
    until the grammar terminates or allows only a stop token."""
    g = manager.new_matcher(manager.compile(params))
    rng = random.Random(seed)
    bm = manager.allocate_bitmask(1)
    stops = list(manager.info.stop_token_ids)
    vocab = manager.info.decoded_vocab
    closers = {t for t in range(min(len(vocab), manager.vocab_size))
               if vocab[t] and set(vocab[t]) <= set(b'"}]')}
    out: list[int] = []
    for _ in range(max_steps):
        if bool(manager.fill_bitmask([g], bm)[0]):
            return tok.decode(out)
        allowed = reference.unpack_token_bitmask(bm, manager.vocab_size)[0]
        stop_ok = [t for t in stops if allowed[t]]
        allowed[stops] = False
        choices = allowed.nonzero().flatten().tolist()
        assert choices or stop_ok, "the grammar allows nothing"
        closing = [t for t in choices if t in closers]
        if stop_ok and (not choices or rng.random() < 0.5):
            t = rng.choice(stop_ok)
        elif closing and rng.random() < 0.3:   # end strings / containers now and then
            t = rng.choice(closing)
        else:
            t = rng.choice(choices)
        assert g.accept(t)
        if g.terminated:
            return tok.decode(out)
        out.append(t)
    pytest.fail(f"walk did not finish in {max_steps} steps: {tok.decode(out)!r}")


SCALARS = st.sampled_from([{"type": "integer"}, {"type": "boolean"}, {"type": "null"},
                           {"type": "string", "maxLength": 6},
                           {"type": "number", "minimum": 0, "maximum": 10},
                           {"enum": ["red", "green", 3]}])


@st.composite
def schemas(draw, depth: int = 0):
    if depth >= 2 or draw(st.booleans()):
        return draw(SCALARS)
    if draw(st.booleans()):
        return {"type": "array", "items": draw(schemas(depth + 1)), "maxItems": 3}
    names = draw(st.lists(st.sampled_from(["a", "b", "name", "x_1", "é"]), min_size=1,
                          max_size=3, unique=True))
    props = {n: draw(schemas(depth + 1)) for n in names}
    required = [n for n in names if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


@settings(max_examples=15, deadline=None)
@given(schema=schemas(), seed=st.integers(0, 10_000), compact=st.booleans())
def test_random_schemas_give_valid_json(byte_manager, schema, seed, compact):
    manager, tok = byte_manager
    text = walk(manager, tok, StructuredOutputsParams(json=schema,
                                                      disable_any_whitespace=compact), seed)
    value = json.loads(text)          # strict: raw control characters would fail here
    jsonschema.validate(value, schema)
    if compact:
        assert not re.search(r"[\t\n\r]", text)


def test_json_object_regex_choice_grammar(byte_manager):
    manager, tok = byte_manager
    for seed in range(3):
        assert isinstance(json.loads(walk(manager, tok, StructuredOutputsParams(
            json_object=True), seed)), dict)
        text = walk(manager, tok, StructuredOutputsParams(regex=r"[a-c]{2,4}-\d\d"), seed)
        assert re.fullmatch(r"[a-c]{2,4}-\d\d", text)
        assert walk(manager, tok, StructuredOutputsParams(choice=["yes", "no", "n/a"]),
                    seed) in ("yes", "no", "n/a")
        text = walk(manager, tok, StructuredOutputsParams(
            grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'), seed)
        assert re.fullmatch(r"\(\d+(\+\d+)*\)", text)


def test_compile_is_cached_and_off_thread(byte_manager):
    import threading

    manager, _ = byte_manager
    p1 = StructuredOutputsParams(json={"type": "object", "properties": {"k": {"type": "string"}}})
    p2 = StructuredOutputsParams(json=json.dumps({"properties": {"k": {"type": "string"}},
                                                  "type": "object"}))
    f1, f2 = manager.submit(p1), manager.submit(p2)
    assert f1 is f2                               # same canonical key
    assert f1.result().grammar is not None
    names = []
    real = manager.compiler.compile_regex

    def spy(*args, **kw):
        names.append(threading.current_thread().name)
        return real(*args, **kw)

    manager.compiler.compile_regex = spy
    try:
        manager.submit(StructuredOutputsParams(regex="zz+")).result()
    finally:
        manager.compiler.compile_regex = real
    assert names and names[0].startswith("minikernels-grammar")   # not the caller's thread


def test_bad_constraints_are_clear_errors(byte_manager):
    manager, _ = byte_manager
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(ValueError, match="structured_outputs.regex is not supported"):
        manager.compile(StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="structured_outputs.grammar is not supported"):
        manager.compile(StructuredOutputsParams(grammar="root ::= undefined_rule"))
    # a failed compile is not cached: the next submit tries again
    assert manager.submit(StructuredOutputsParams(regex="(unclosed")).exception() is not None


def test_hf_tokenizer(tmp_path):
    """A byte-level BPE tokenizer trained here (no network): JSON and choices still hold."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minikernels.models.tokenizer import HFTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ['{"name": "alpha", "n": 12}', '{"name": "beta", "ok": true}', "yes no maybe"] * 50
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tok = HFTokenizer(hf)
    vocab = len(hf) + 5                     # a wider lm_head than the tokenizer
    manager = StructuredOutputManager(tok, vocab, tok.eos_token_ids)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    for seed in range(4):
        value = json.loads(walk(manager, tok, StructuredOutputsParams(json=schema), seed))
        jsonschema.validate(value, schema)
        assert walk(manager, tok, StructuredOutputsParams(choice=["yes", "maybe"]),
                    seed) in ("yes", "maybe")
    bm = manager.allocate_bitmask(1)
    manager.fill_bitmask([manager.new_matcher(manager.compile(
        StructuredOutputsParams(json=schema)))], bm)
    allowed = reference.unpack_token_bitmask(bm, vocab)[0]
    assert not allowed[len(hf):].any()      # ids past the tokenizer are never allowed
    assert bm.dtype == torch.int32


def test_mask_logits_rows(byte_manager):
    manager, tok = byte_manager
    g1 = manager.new_matcher(manager.compile(StructuredOutputsParams(choice=["ab", "b"])))
    g2 = manager.new_matcher(manager.compile(StructuredOutputsParams(regex="[0-9]+")))
    logits = torch.randn(4, VOCAB + 6)          # lm_head wider than the vocab
    before = logits.clone()
    manager.mask_logits(logits, [3, 1], [g1, g2])
    ok3 = torch.isfinite(logits[3]).nonzero().flatten().tolist()
    ok1 = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert ok3 == [ord("a"), ord("b")]
    assert ok1 == list(range(ord("0"), ord("9") + 1))
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    torch.testing.assert_close(logits[3, ok3], before[3, ok3])


def _advanced(manager, params: StructuredOutputsParams, steps: int, seed: int):
    """A matcher moved ``steps`` random allowed (non-stop) tokens into its grammar."""
    g = manager.new_matcher(manager.compile(params))
    rng = random.Random(seed)
    bm = manager.allocate_bitmask(1)
    stops = list(manager.info.stop_token_ids)
    for _ in range(steps):
        manager.fill_bitmask([g], bm)
        allowed = reference.unpack_token_bitmask(bm, manager.vocab_size)[0]
        allowed[stops] = False
        choices = allowed.nonzero().flatten().tolist()
        if not choices:
            break
        assert g.accept(rng.choice(choices))
    return g


def _expected_masked(manager, logits: torch.Tensor, rows, grammars) -> torch.Tensor:
    """The per-row path: each grammar fills a fresh all-ones row; disallowed -> -inf."""
    out = logits.clone()
    bm = manager.allocate_bitmask(1)
    for r, g in zip(rows, grammars):
        bm.fill_(-1)
        manager.fill_bitmask([g], bm)
        allowed = torch.zeros(out.shape[1], dtype=torch.bool)
        allowed[:manager.vocab_size] = reference.unpack_token_bitmask(bm, manager.vocab_size)[0]
        out[r] = out[r].masked_fill(~allowed, float("-inf"))
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["all", "block", "scattered", "unsorted", "single"])
def test_mask_logits_equals_per_row_path(byte_manager, layout, backend):
    """The persistent-buffer path (spans, indices, control characters on JSON rows only,
    padded lm_head columns) == filling every row on its own; batches growing and shrinking
    reuse the host buffer without stale rows leaking into the mask. Both mask-op backends
    (the Triton kernel in the interpreter on a CPU: row-span views of the logits)."""
    import minikernels as mk

    manager, _ = byte_manager
    kinds = [StructuredOutputsParams(json={"type": "object", "properties": {
                 "s": {"type": "string"}, "n": {"type": "integer"}}}),
             StructuredOutputsParams(regex=r"[a-z\n]{0,6}[0-9]+"),
             StructuredOutputsParams(json_object=True),
             StructuredOutputsParams(choice=["ab", "b\tc"])]
    rng = random.Random(hash(layout) % 1000)
    # grow past the buffer, then shrink (the interpreter is slow: small batches there)
    for batch in ((5, 150, 9) if backend == "reference" else (5, 70, 9)):
        if layout == "all":
            rows = list(range(batch))
        elif layout == "block":
            rows = list(range(1, batch - 1))
        elif layout == "scattered":
            rows = sorted(rng.sample(range(batch), max(2, batch // 3)))
        elif layout == "unsorted":
            rows = rng.sample(range(batch), max(2, batch // 2))
        else:
            rows = [batch - 1]
        grammars = [_advanced(manager, kinds[(r + batch) % len(kinds)], rng.randrange(6),
                              rng.randrange(10_000)) for r in rows]
        logits = torch.randn(batch, VOCAB + 7)
        expected = _expected_masked(manager, logits, rows, grammars)
        with mk.use_backend(backend):
            manager.mask_logits(logits, rows, grammars)
        assert torch.equal(logits, expected), (layout, batch)


def test_native_accept_equals_public_accept(byte_manager):
    """SequenceGrammar.accept's direct call into xgrammar's native matcher == the public
    GrammarMatcher.accept_token, token by token (the masks stay equal, refusals too)."""
    manager, _ = byte_manager
    compiled = manager.compile(StructuredOutputsParams(json={"type": "array", "items": {
        "type": "integer"}, "maxItems": 4}))
    fast, slow = manager.new_matcher(compiled), manager.new_matcher(compiled)
    assert fast._native_accept is not None     # xgrammar exposes it (else: public path)
    slow._native_accept = None
    rng = random.Random(5)
    bm_f, bm_s = manager.allocate_bitmask(1), manager.allocate_bitmask(1)
    for _ in range(40):
        manager.fill_bitmask([fast], bm_f)
        manager.fill_bitmask([slow], bm_s)
        assert torch.equal(bm_f, bm_s)
        allowed = reference.unpack_token_bitmask(bm_f, manager.vocab_size)[0]
        refused = (~allowed).nonzero().flatten().tolist()
        assert fast.accept(refused[0]) is slow.accept(refused[0]) is False
        choices = allowed.nonzero().flatten().tolist()
        t = rng.choice(choices)
        assert fast.accept(t) is slow.accept(t) is True
        if fast.terminated:
            assert slow.terminated
            break
