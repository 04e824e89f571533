"""Incremental detokenizers: streamed text == one-shot decode, for each implementation."""
from __future__ import annotations

import random

import pytest

from minikernels.engine.detokenizer import (ByteDetokenizer, StreamDetokenizer,
                                            WindowDetokenizer, make_detokenizer)
from minikernels.models.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def bpe():
    from minikernels.engine.bench_engine import BenchTokenizer

    return BenchTokenizer(vocab=400)


def stream(det, ids):
    out = "".join(det.step(t) for t in ids)
    return out + det.flush()


def test_decode_stream_matches_full_decode(bpe):
    rng = random.Random(0)
    text = "Héllo wörld — 你好, 世界 🙂 def f(x): return x ** 2  # ok\n" * 3
    ids = bpe.encode(text)
    prompt = bpe.encode("The prompt says")
    det = make_detokenizer(bpe, prompt, skip_special_tokens=True)
    assert isinstance(det, StreamDetokenizer)
    assert stream(det, ids) == bpe.decode(ids) == det.text
    for _ in range(20):                      # random ids: partial UTF-8 sequences included
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randint(1, 40))]
        det = make_detokenizer(bpe, prompt)
        assert stream(det, ids) == bpe.decode(ids)


def test_byte_detokenizer_matches_byte_tokenizer():
    tok = ByteTokenizer(vocab_size=300)
    rng = random.Random(1)
    cases = [list("héllo 你好 🙂".encode()), [0xE4, 0xBD], [0xFF, 0x41, 0xE4, 0xBD, 0xA0]]
    cases += [[rng.randrange(300) for _ in range(rng.randint(1, 30))] for _ in range(30)]
    for ids in cases:
        for skip in (True, False):
            det = make_detokenizer(tok, [1, 2], skip_special_tokens=skip)
            assert isinstance(det, ByteDetokenizer)
            assert stream(det, ids) == tok.decode(ids, skip_special_tokens=skip), ids


def test_window_fallback_for_any_tokenizer():
    tok = ByteTokenizer(vocab_size=300)
    ids = list("naïve café ☕".encode()) + [0xE2]
    det = WindowDetokenizer(tok, [5, 6])
    assert stream(det, ids) == tok.decode(ids)


def test_text_buffer_tail_and_cut(bpe):
    det = make_detokenizer(bpe, [])
    for t in bpe.encode("abc def ghi jkl"):
        det.step(t)
    assert det.tail(5) == "i jkl" and det.num_chars == len("abc def ghi jkl")
    det.cut(7)
    assert det.text == "abc def" and det.tail(3) == "def"
