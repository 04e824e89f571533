"""Incremental detokenizers: streamed text == one-shot decode, for each implementation."""
from __future__ import annotations

import random

import pytest

from minikernels.engine.detokenizer import (ByteDetokenizer, ByteLevelDetokenizer,
                                            StreamDetokenizer, WindowDetokenizer,
                                            byte_level_table, make_detokenizer)
from minikernels.models.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def bpe():
    from minikernels.benchmarks.engine import BenchTokenizer

    return BenchTokenizer(vocab=400)


def stream(det, ids):
    out = "".join(det.step(t) for t in ids)
    return out + det.flush()


@pytest.mark.parametrize("kind", ["byte-level", "decode-stream"])
def test_incremental_matches_full_decode(bpe, kind):
    rng = random.Random(0)
    text = "Héllo wörld — 你好, 世界 🙂 def f(x): return x ** 2  # ok\n" * 3
    ids = bpe.encode(text)
    prompt = bpe.encode("The prompt says")

    def make(skip=True):
        if kind == "decode-stream":
            return StreamDetokenizer(bpe.backend_tokenizer, prompt, skip)
        det = make_detokenizer(bpe, prompt, skip_special_tokens=skip)
        assert isinstance(det, ByteLevelDetokenizer)      # the default for byte-level BPE
        return det

    det = make()
    assert stream(det, ids) == bpe.decode(ids) == det.text
    for _ in range(40):                      # random ids: partial UTF-8 sequences included
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            det = make(skip)
            assert stream(det, ids) == bpe.decode(ids, skip_special_tokens=skip) == det.text


def test_byte_level_added_tokens_match_tokenizers():
    # Added tokens (special or not, non-ASCII content) between partial UTF-8 bytes: the
    # table-driven detokenizer must decode exactly as tokenizers' own decode does.
    from minikernels.benchmarks.engine import BenchTokenizer

    tok = BenchTokenizer(vocab=300)
    rust = tok.backend_tokenizer
    rust.add_special_tokens(["<|im_end|>"])
    rust.add_tokens(["ñandú", "<tool>"])
    end, nandu, tool = (rust.token_to_id(t) for t in ("<|im_end|>", "ñandú", "<tool>"))
    tables = byte_level_table(rust)
    assert tables is not None
    rng = random.Random(3)
    vocab = rust.get_vocab_size(with_added_tokens=True)
    e_acute = tok.encode("é")                # may be 1 or 2 tokens
    cases = [[e_acute[0], end, *e_acute], [nandu, tool, end], e_acute[:1] + [nandu]]
    cases += [[rng.choice([end, nandu, tool, rng.randrange(vocab)]) for _ in range(20)]
              for _ in range(60)]
    for ids in cases:
        for skip in (True, False):
            det = make_detokenizer(tok, [], skip_special_tokens=skip)
            assert isinstance(det, ByteLevelDetokenizer)
            assert stream(det, ids) == rust.decode(ids, skip_special_tokens=skip), ids


def test_non_byte_level_tokenizer_uses_decode_stream():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["hello world, héllo wörld"] * 10,
                            trainers.BpeTrainer(vocab_size=80, show_progress=False))
    assert byte_level_table(tok) is None
    ids = tok.encode("héllo world").ids
    det = make_detokenizer(tok, [])
    assert isinstance(det, StreamDetokenizer)
    assert stream(det, ids) == tok.decode(ids)


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
