"""Incremental detokenizers: output token ids -> text, one step at a time, O(1) per token.

``make_detokenizer(tokenizer, prompt_ids, skip_special_tokens)`` picks the cheapest exact
one for the tokenizer:

- ``ByteLevelDetokenizer``: HF fast tokenizers with a byte-level BPE decoder (GPT-2,
  Llama 3, Qwen 2/2.5/3): a per-token byte table (built once per tokenizer and checked
  against its ``decode``) fed to Python's incremental UTF-8 decoder. About 0.3 us per
  token.
- ``StreamDetokenizer``: the ``tokenizers`` library's ``DecodeStream`` (Rust) for other HF
  fast tokenizers whose decode does no ``clean_up_tokenization_spaces`` pass
  (DecodeStream does not apply it). About 1-2 us per token.
- ``ByteDetokenizer``: the byte tokenizer of the built-in dummy models (ids 0..255 are
  UTF-8 bytes), through Python's incremental UTF-8 decoder.
- ``WindowDetokenizer``: any object with ``decode(ids, skip_special_tokens)``: decodes a
  short window of recent tokens twice per step (the classic vLLM algorithm).

All of them hold back bytes of an incomplete UTF-8 character until the next token
completes it; ``flush()`` at the end emits what is held (as U+FFFD, like a one-shot
decode). Text is kept as a short list of chunks (joined every 64 chunks and on demand),
so appending is O(delta) amortized however long the output grows.
"""
from __future__ import annotations

import codecs
import functools
from typing import Any, Protocol


class Detokenizer(Protocol):
    """What the engine uses: ``append(ids) -> new text``, ``flush()``, ``text``, ``cut``."""

    def append(self, token_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


class _TextBuffer:
    """Output text as chunks: O(1) append, joined lazily; a bounded tail for stop strings."""

    __slots__ = ("_chunks", "_joined", "num_chars")

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._joined = ""
        self.num_chars = 0

    def add(self, s: str) -> None:
        if s:
            chunks = self._chunks
            chunks.append(s)
            self.num_chars += len(s)
            if len(chunks) >= 64:       # keep the list short (memory, GC traversal)
                self._joined += "".join(chunks)
                chunks.clear()

    @property
    def text(self) -> str:
        if self._chunks:
            self._joined += "".join(self._chunks)
            self._chunks.clear()
        return self._joined

    def tail(self, n: int) -> str:
        """The last n characters (joins only the chunks it needs)."""
        if not self._chunks or n <= 0:
            return self.text[-n:] if n > 0 else ""
        out, have = [], 0
        for c in reversed(self._chunks):
            out.append(c)
            have += len(c)
            if have >= n:
                return "".join(reversed(out))[-n:]
        return (self._joined[-(n - have):] if n > have else "") + "".join(reversed(out))

    def cut(self, num_chars: int) -> None:
        """Keep only the first num_chars characters (a stop string matched)."""
        self._joined = self.text[:num_chars]
        self.num_chars = len(self._joined)


class _BaseDetokenizer:
    """Text bookkeeping shared by the detokenizers (subclasses implement ``_step``)."""

    def __init__(self) -> None:
        self.buf = _TextBuffer()

    @property
    def text(self) -> str:
        return self.buf.text

    @property
    def num_chars(self) -> int:
        return self.buf.num_chars

    def tail(self, n: int) -> str:
        return self.buf.tail(n)

    def cut(self, num_chars: int) -> None:
        self.buf.cut(num_chars)

    def append(self, token_ids: list[int]) -> str:
        """Add new output tokens; return the text they complete (may be "")."""
        delta = self._step(token_ids)
        self.buf.add(delta)
        return delta

    def step(self, token_id: int) -> str:
        """Add one output token (the per-step hot path); return the text it completes."""
        return self.append([token_id])

    def flush(self) -> str:
        """At the end: emit held-back bytes too (an incomplete character -> U+FFFD)."""
        delta = self._flush()
        self.buf.add(delta)
        return delta

    def _step(self, token_ids: list[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _flush(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class WindowDetokenizer(_BaseDetokenizer):
    """Any tokenizer: decode ids[prefix:read] and ids[prefix:] each step, emit the
    difference unless it ends in U+FFFD. Starts on the last few prompt tokens so the first
    output token gets its leading space right (SentencePiece)."""

    PROMPT_CONTEXT = 4

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-self.PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) \
            if ids else ""

    def _step(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            # Keep the id list short: only the window is ever decoded again.
            if self.prefix_offset > 64:
                del self.ids[:self.prefix_offset]
                self.read_offset -= self.prefix_offset
                self.prefix_offset = 0
            return full[len(prefix):]
        return ""

    def _flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StreamDetokenizer(_BaseDetokenizer):
    """``tokenizers.decoders.DecodeStream`` over a ``tokenizers.Tokenizer`` (Rust)."""

    PROMPT_CONTEXT = 4

    def __init__(self, rust_tokenizer: Any, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        from tokenizers.decoders import DecodeStream

        super().__init__()
        self.tok = rust_tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-self.PROMPT_CONTEXT:])
        self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self.held: list[int] = []        # tokens whose text is not out yet
        self.context = context[-2:]      # tokens before ``held`` (for the flush decode)

    def step(self, token_id: int) -> str:
        s = self.stream.step(self.tok, token_id)
        if s is None:
            self.held.append(token_id)
            return ""
        if self.held:
            self.context = (self.held + [token_id])[-2:]
            self.held = []
        else:
            self.context = [self.context[-1], token_id] if self.context else [token_id]
        self.buf.add(s)
        return s

    def _step(self, token_ids: list[int]) -> str:
        out = []
        for t in token_ids:
            s = self.stream.step(self.tok, t)
            if s is None:
                self.held.append(t)
            else:
                out.append(s)
                self.context = (self.held + [t])[-2:] if self.held else [t]
                self.held = []
        return "".join(out) if len(out) != 1 else out[0]

    def _flush(self) -> str:
        if not self.held:
            return ""
        decode = self.tok.decode
        skip = self.skip_special_tokens
        prefix = decode(self.context, skip_special_tokens=skip)
        full = decode(self.context + self.held, skip_special_tokens=skip)
        self.held = []
        return full[len(prefix):] if len(full) > len(prefix) else ""


_BYTE_TABLES: dict[int, tuple[Any, list, dict, bool]] = {}


@functools.lru_cache(maxsize=1)
def gpt2_char_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def byte_level_table(rust_tok: Any) -> tuple[list, dict] | None:
    """(bytes per token id (None: special), {special token id: (content, True)}) for a
    ``tokenizers.Tokenizer`` whose decoder is plain ByteLevel, or None when it is not
    one or the table does not reproduce its ``decode`` (checked once, cached)."""
    key = id(rust_tok)
    hit = _BYTE_TABLES.get(key)
    if hit is not None and hit[0] is rust_tok:
        return (hit[1], hit[2]) if hit[3] else None
    table, added, ok = [], {}, False
    try:
        from tokenizers import decoders
        if isinstance(rust_tok.decoder, decoders.ByteLevel):
            table, added = _build_byte_table(rust_tok)
            ok = _check_byte_table(rust_tok, table, added)
    except Exception:  # noqa: BLE001 - any surprise: use the generic detokenizer
        ok = False
    _BYTE_TABLES[key] = (rust_tok, table, added, ok)   # keeps rust_tok alive: id stays valid
    return (table, added) if ok else None


def _build_byte_table(tok: Any) -> tuple[list, dict]:
    c2b = gpt2_char_to_byte()
    decoder = tok.get_added_tokens_decoder()
    # Special tokens are emitted as they are (pending bytes flushed first); other added
    # tokens go through the ByteLevel decoder like model tokens (tokenizers 0.2x).
    added = {i: (t.content, True) for i, t in decoder.items() if t.special}
    size = tok.get_vocab_size(with_added_tokens=True)
    size = max([size] + [i + 1 for i in decoder])
    table: list = [b""] * size
    for i in range(size):
        if i in added:
            table[i] = None
            continue
        piece = decoder[i].content if i in decoder else tok.id_to_token(i)
        if piece is None:
            continue                      # a hole in the vocabulary decodes to nothing
        try:
            table[i] = bytes([c2b[ch] for ch in piece])
        except KeyError:                  # not byte-level text: the ByteLevel decoder
            table[i] = piece.encode("utf-8")  # keeps such a token's own UTF-8 bytes
    return table, added


def _check_byte_table(tok: Any, table: list, added: dict) -> bool:
    """Compare the table's decoding with ``tok.decode`` on probes: every added token,
    in and out of partial UTF-8 sequences, and a strided sample of the vocabulary."""
    n = len(table)
    partial = next((i for i in range(n) if table[i] is not None and len(table[i]) == 1
                    and table[i][0] >= 0xC2 and table[i][0] < 0xF0), None)
    probes = [list(range(j, min(n, j + 64))) for j in range(0, n, max(64, n // 200))]
    for a in list(added)[:256]:
        probes.append([a])
        if partial is not None:
            probes.append([partial, a, partial])
    for skip in (True, False):
        for ids in probes:
            det = ByteLevelDetokenizer(table, added, skip)
            got = "".join(det.step(t) for t in ids) + det.flush()
            if got != tok.decode(ids, skip_special_tokens=skip):
                return False
    return True


class ByteLevelDetokenizer(_BaseDetokenizer):
    """Byte-level BPE (see ``byte_level_table``): each model token is a fixed byte
    string, decoded incrementally as UTF-8 (a token whose bytes are whole characters,
    with nothing pending, is one list look-up). A special token is emitted as its own
    text after the pending bytes are flushed (as ``tokenizers`` decodes it); a skipped
    one is invisible."""

    def __init__(self, table: list, added: dict, skip_special_tokens: bool = True) -> None:
        super().__init__()
        self.table = table
        self.texts = _texts_of(table)
        self.added = added
        self.skip_special_tokens = skip_special_tokens
        self.pending = b""                 # bytes of an incomplete character

    def step(self, token_id: int) -> str:
        s = self.texts[token_id] if not self.pending and 0 <= token_id < len(self.texts) \
            else None
        if s is None:
            s = self._slow(token_id)
        if s:                              # _TextBuffer.add, inlined (per-token hot path)
            buf = self.buf
            chunks = buf._chunks
            chunks.append(s)
            buf.num_chars += len(s)
            if len(chunks) >= 64:
                buf._joined += "".join(chunks)
                chunks.clear()
        return s

    def _slow(self, token_id: int) -> str:
        b = self.table[token_id] if 0 <= token_id < len(self.table) else b""
        if b is None:                      # a special token
            content, special = self.added[token_id]
            if special and self.skip_special_tokens:
                return ""
            return self._flush() + content
        data = self.pending + b
        s, used = _utf8_decode(data, "replace", False)
        self.pending = data[used:]
        return s

    def _step(self, token_ids: list[int]) -> str:
        out = []
        for t in token_ids:
            s = self.texts[t] if not self.pending and 0 <= t < len(self.texts) else None
            out.append(s if s is not None else self._slow(t))
        return "".join(out)

    def _flush(self) -> str:
        if not self.pending:
            return ""
        s = _utf8_decode(self.pending, "replace", True)[0]
        self.pending = b""
        return s


_utf8_decode = codecs.utf_8_decode
_TEXTS: dict[int, tuple[list, list]] = {}


def _texts_of(table: list) -> list:
    """Per token: its text when its bytes are whole UTF-8 characters, else None."""
    hit = _TEXTS.get(id(table))
    if hit is not None and hit[0] is table:
        return hit[1]
    texts: list = [None] * len(table)
    for i, b in enumerate(table):
        if b is not None:
            try:
                texts[i] = b.decode("utf-8")
            except UnicodeDecodeError:
                pass
    _TEXTS[id(table)] = (table, texts)
    return texts


class ByteDetokenizer(_BaseDetokenizer):
    """The dummy models' byte tokenizer: ids < 256 are UTF-8 bytes, the rest specials or
    ``<id>`` (see ``minikernels.models.tokenizer.ByteTokenizer``)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _step(self, token_ids: list[int]) -> str:
        if len(token_ids) == 1 and token_ids[0] < 256:
            return self.utf8.decode(bytes(token_ids))
        out = []
        for t in token_ids:
            if t < 256:
                out.append(self.utf8.decode(bytes((t,))))
            else:  # a special or out-of-byte id: its text ends any pending bytes
                s = self.tokenizer.decode([t], skip_special_tokens=self.skip_special_tokens)
                if s:
                    out.append(self.utf8.decode(b"", final=True))
                    out.append(s)
        return "".join(out)

    def _flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def rust_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` when DecodeStream decodes exactly
    as its ``decode`` does (no clean-up pass), else None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency of transformers
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    hf = getattr(tokenizer, "tokenizer", tokenizer)       # HFTokenizer wraps a transformers one
    backend = getattr(hf, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer) and not getattr(hf, "clean_up_tokenization_spaces", False):
        return backend
    return None


def make_detokenizer(tokenizer: Any, prompt_token_ids: list[int],
                     skip_special_tokens: bool = True) -> _BaseDetokenizer:
    """The cheapest exact incremental detokenizer for ``tokenizer`` (module docstring)."""
    from ..models.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return ByteDetokenizer(tokenizer, skip_special_tokens)
    rust = rust_tokenizer(tokenizer)
    if rust is not None:
        tables = byte_level_table(rust)
        if tables is not None:
            return ByteLevelDetokenizer(tables[0], tables[1], skip_special_tokens)
        return StreamDetokenizer(rust, prompt_token_ids, skip_special_tokens)
    return WindowDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
